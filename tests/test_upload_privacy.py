"""What happens to an uploaded image: a DICOM file with patient details is classified on the Predict
page, and its patient details are not shown, logged or in the CSV; nothing of the upload reaches disk."""
from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from badfiles import dicom_bytes
from conftest import _xray_like
from test_app import HOME, TIMEOUT, render, text_of

# Distinctive values: none of them can appear on a page or in a log by chance.
PATIENT = {
    "PatientName": "Quibbleworth^Zanthia",
    "PatientID": "PID-73910-XQ",
    "PatientBirthDate": "19230417",
    "OtherPatientIDs": "OPID-55821-ZV",
    "PatientAddress": "17 Larkspur Crescent Ulverholm",
    "InstitutionName": "Saint Grimbald Infirmary",
    "ReferringPhysicianName": "Drummle^Ottoline",
    "AccessionNumber": "ACC88213XK",
}
# PN values are also written with '^' turned into spaces by some viewers.
NEEDLES = [*PATIENT.values(), "Quibbleworth", "Zanthia", "Drummle", "Ottoline"]


def _patient_dicom() -> tuple[bytes, bytes]:
    """A chest-X-ray-like DICOM file with patient tags; returns it and a slice of its pixel bytes."""
    pixels = _xray_like(np.random.default_rng(3), 96, True)
    data = dicom_bytes(pixels, bits=8, **PATIENT)
    for value in PATIENT.values():
        assert value.encode() in data  # the file really carries them
    return data, pixels.tobytes()[2048:4096]


def _snapshot(roots: list[Path]) -> dict[str, tuple[float, int]]:
    seen: dict[str, tuple[float, int]] = {}
    for root in roots:
        for folder, _, names in os.walk(root, onerror=lambda _error: None):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                seen[path] = (stat.st_mtime, stat.st_size)
    return seen


def _written_with(before: dict, after: dict, needles: list[bytes]) -> list[str]:
    """New or changed files (under 256 MB) holding any of ``needles``."""
    hits = []
    for path, (mtime, size) in after.items():
        if before.get(path) == (mtime, size) or size > 256 * 2**20:
            continue
        try:
            content = Path(path).read_bytes()
        except OSError:
            continue
        if any(needle in content for needle in needles):
            hits.append(path)
    return hits


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a badly formatted record still counts, by its parts
            message = f"{record.msg} {record.args}"
        self.lines.append(f"{record.name} {message} {record.exc_text or ''}")


def _page_dump(at: AppTest) -> str:
    """Every element's protobuf of the last run (text, captions, tables, image captions...)."""
    parts = [text_of(at)]
    stack = [at._tree]
    while stack:
        node = stack.pop()
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.append(str(proto))
        stack.extend(getattr(node, "children", {}).values())
    return "\n".join(parts)


@pytest.mark.slow
def test_a_dicom_upload_with_patient_tags_gives_a_result_without_them(monkeypatch):
    import pandas as pd
    import streamlit

    from cxr_core.runs import registry as runs
    from cxr_core.runs.run_folder import RunFolder

    monkeypatch.delenv("CXR_DEMO_RUN")
    if not RunFolder(runs.DEMO_RUN_DIR).has_model():
        pytest.skip("no demo run in artifacts/")
    data, pixel_slice = _patient_dicom()

    downloads = []
    real_download_button = streamlit.download_button

    def recording_download_button(label, payload, *args, **kwargs):
        downloads.append(payload)
        return real_download_button(label, payload, *args, **kwargs)

    monkeypatch.setattr(streamlit, "download_button", recording_download_button)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/predict.py", "predict (demo run)")
    assert "they are not saved" in text_of(at) and "DICOM patient details are never read out" in text_of(at)

    roots = [Path(os.environ["CXR_DATA_ROOT"]), Path(os.environ["CXR_RUNS_DIR"]), Path(tempfile.gettempdir())]
    before = _snapshot(roots)
    records = _Records()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("streamlit", "cxr_core", "pydicom"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            at.file_uploader(key="predict_upload").set_value([("study.dcm", data, "application/dicom")])
            render(at, None, "predict (DICOM with patient tags)")
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(records)
            lg.setLevel(level)
    after = _snapshot(roots)

    # A prediction came out of the file.
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert list(table["file"]) == ["study.dcm"]
    assert 0.0 <= float(table.loc[0, "probability"]) <= 1.0
    assert table.loc[0, "label"] in ("NORMAL", "PNEUMONIA")
    assert len(downloads) == 1
    csv_text = downloads[0] if isinstance(downloads[0], str) else downloads[0].decode()
    assert list(pd.read_csv(io.StringIO(csv_text))["file"]) == ["study.dcm"]

    # None of the patient's details anywhere: the CSV, the page, the logs, the warnings.
    page = _page_dump(at)
    assert "study.dcm" in page and "Grad-CAM" in page  # the dump does hold the page
    logs = "\n".join(records.lines)
    shown = "\n".join(str(w.message) for w in caught)
    for needle in NEEDLES:
        assert needle not in csv_text, needle
        assert needle not in page, needle
        assert needle not in logs, needle
        assert needle not in shown, needle
    assert records.lines, "no log record was captured, so the log check proves nothing"

    # Nothing of the upload was written under the data root, the runs root or the temp folder.
    needles = [pixel_slice, data[-4096:], *(v.encode() for v in PATIENT.values())]
    assert _written_with(before, after, needles) == []


def test_a_dicom_file_is_read_without_its_patient_elements():
    """Only the image's own elements are parsed, so no later message or log can quote a patient tag."""
    from cxr_core.io import images

    data, _ = _patient_dicom()
    ds = images._read_dicom(data, "study.dcm", stop_before_pixels=False)
    assert {"Rows", "Columns", "PhotometricInterpretation", "BitsStored", "PixelData"} <= set(ds.dir())
    for keyword in PATIENT:
        assert keyword not in ds
    header = images._read_dicom(data, "study.dcm", stop_before_pixels=True)
    assert "PatientName" not in header and "Rows" in header
    assert images.load_gray(data, "study.dcm").shape == (96, 96)


def test_formats_pillow_decodes_through_temporary_files_are_refused():
    """An EPS disguised as a PNG would be rasterised by Ghostscript through temporary files; it is refused
    before that, as is any format beyond JPEG, PNG, BMP, TIFF and DICOM."""
    from cxr_core.core.errors import BadImageError
    from cxr_core.io.images import image_header, load_gray

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\n%%EOF\n"
    for read in (load_gray, image_header):
        with pytest.raises(BadImageError, match=r"chest\.png is not an image this program can read"):
            read(eps, "chest.png")
