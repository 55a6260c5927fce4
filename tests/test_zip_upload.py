"""The Dataset page's zip uploader on a small server: the limit comes from the server's memory, an
accepted archive goes to disk at once and leaves the server's memory, and only one archive is
unpacked at a time."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
from streamlit.runtime.uploaded_file_manager import UploadedFile
from streamlit.testing.v1 import AppTest

from conftest import make_dataset
from cxr_core.hosting import resources

HOME = str(Path(__file__).resolve().parents[1] / "Home.py")
HELD_ZIP = "dataset_held_zip"


def render(at: AppTest, page: str | None = None) -> AppTest:
    if page:
        at.switch_page(page)
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    return at


def zip_of_a_dataset(tmp_path) -> bytes:
    source = make_dataset(tmp_path / "zipped", n_normal=4, n_pneumonia=4, size=32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*.jpeg")):
            archive.write(path, path.relative_to(source).as_posix())
    return buffer.getvalue()


def test_the_zip_uploader_limit_comes_from_the_server(monkeypatch):
    monkeypatch.setenv("CXR_MAX_UPLOAD_MB", "7")
    at = render(AppTest.from_file(HOME))
    render(at, "pages/dataset.py")
    assert at.file_uploader(key="dataset_zip").proto.max_upload_size_mb == 7
    assert any("up to **7 MB**" in m.value for m in at.markdown)


def test_a_bad_limit_setting_is_one_sentence_and_the_memory_limit_is_used(monkeypatch):
    monkeypatch.setenv("CXR_MAX_UPLOAD_MB", "-3")
    at = render(AppTest.from_file(HOME))
    render(at, "pages/dataset.py")
    assert [e.value for e in at.error] == [
        "CXR_MAX_UPLOAD_MB must be a whole number of megabytes above 0, not '-3'; fix or unset it."]
    expected = resources.upload_limit_mb(resources.memory_limit_bytes(), 1024, env={})
    assert at.file_uploader(key="dataset_zip").proto.max_upload_size_mb == expected


def test_an_accepted_zip_goes_to_disk_and_leaves_the_server_memory(tmp_path, monkeypatch):
    removed = []
    original = MemoryUploadedFileManager.remove_file

    def spy(self, session_id, file_id):
        removed.append(file_id)
        return original(self, session_id, file_id)

    monkeypatch.setattr(MemoryUploadedFileManager, "remove_file", spy)
    payload = zip_of_a_dataset(tmp_path)
    at = render(AppTest.from_file(HOME))
    render(at, "pages/dataset.py")
    at.file_uploader(key="dataset_zip").set_value(("Ward 3.zip", payload, "application/zip"))
    render(at)
    held = at.session_state[HELD_ZIP]
    assert Path(held["path"]).read_bytes() == payload
    assert Path(held["path"]).parent == resources.spool_folder(os.environ["CXR_DATA_ROOT"])
    assert len(removed) == 1  # Streamlit's copy of the bytes is dropped at once
    # The uploader that held the file is gone; a new, empty one takes its place.
    assert [u.key for u in at.file_uploader] == []
    assert not any(isinstance(value, UploadedFile) for value in at.session_state.values())
    assert "`Ward 3.zip`" in " ".join(c.value for c in at.caption)
    next(b for b in at.button if b.label.startswith("Unpack into the data folder")).click()
    render(at)
    assert at.session_state["dataset"] == "Ward-3"
    assert not Path(held["path"]).exists()  # the spooled archive is removed once unpacked
    assert [u.key for u in at.file_uploader] == ["dataset_zip-1"]


@pytest.mark.slow
def test_a_second_unpack_at_the_same_time_is_refused_with_one_sentence(tmp_path):
    payload = zip_of_a_dataset(tmp_path)
    root = Path(os.environ["CXR_DATA_ROOT"])
    at = render(AppTest.from_file(HOME))
    render(at, "pages/dataset.py")
    at.file_uploader(key="dataset_zip").set_value(("ward.zip", payload, "application/zip"))
    render(at)
    with resources.unpack_slot(root):  # another visitor's archive is being unpacked
        next(b for b in at.button if b.label.startswith("Unpack into the data folder")).click()
        render(at)
    busy = "Another archive is being unpacked on this server; try again when it has finished."
    assert [w.value for w in at.warning if "archive" in w.value] == [busy]
    assert not (root / "ward").exists()
    assert Path(at.session_state[HELD_ZIP]["path"]).is_file()  # kept for the next try
    next(b for b in at.button if b.label.startswith("Unpack into the data folder")).click()
    render(at)
    assert at.session_state["dataset"] == "ward"


def test_a_held_zip_can_be_removed(tmp_path):
    at = render(AppTest.from_file(HOME))
    render(at, "pages/dataset.py")
    at.file_uploader(key="dataset_zip").set_value(("ward.zip", zip_of_a_dataset(tmp_path), "application/zip"))
    render(at)
    path = Path(at.session_state[HELD_ZIP]["path"])
    next(b for b in at.button if b.label == "Remove it").click()
    render(at)
    assert not path.exists()
    assert HELD_ZIP not in at.session_state
    assert [u.key for u in at.file_uploader] == ["dataset_zip-1"]
