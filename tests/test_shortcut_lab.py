"""The shortcut lab: a copy of a data set with a planted marker, the marker's place in its manifest,
the shortcut check that finds it, and ``marker_attention`` (does the model's Grad-CAM peak on it?)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import make_dataset
from cxr_core.cli import main
from cxr_core.core.errors import BadDatasetError, BadSettingError
from cxr_core.data import shortcut_lab
from cxr_core.data.practice import make_practice_dataset
from cxr_core.data.scan import scan_dataset
from cxr_core.data.shortcut_lab import MARKER_COLUMNS, make_shortcut_lab
from cxr_core.data.shortcuts import shortcut_check
from cxr_core.evaluation.external import marker_attention, peak_on_marker
from cxr_core.io.images import load_gray

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def practice(tmp_path_factory) -> Path:
    """The synthetic practice set at 96 px (60 NORMAL, 160 PNEUMONIA, JPEG)."""
    return make_practice_dataset(tmp_path_factory.mktemp("practice") / "synthetic", size=96)


@pytest.fixture(scope="module")
def lab(practice: Path, tmp_path_factory) -> shortcut_lab.LabResult:
    return make_shortcut_lab(practice, tmp_path_factory.mktemp("labs") / "lab", seed=5)


def _original(source: Path, copy_relpath: str) -> Path:
    """The original of a copied image: the same folder and stem."""
    stem = Path(copy_relpath)
    return next((source / stem.parent).glob(f"{stem.stem}.*"))


def _one_sentence(text: str) -> bool:
    return text.endswith(".") and ". " not in text and "\n" not in text


# --- The copy -------------------------------------------------------------------------------------
def test_marker_pixels_are_where_the_manifest_says_and_nothing_else_changes(practice: Path, lab):
    table = pd.read_csv(lab.folder / "manifest.csv")
    assert list(table.columns[-5:]) == MARKER_COLUMNS and len(table) == 220
    for row in table.itertuples(index=False):
        copy_path = lab.folder / row.path
        assert copy_path.suffix == ".png" and copy_path.read_bytes()[:8] == PNG_MAGIC
        before, after = load_gray(_original(practice, row.path)), load_gray(copy_path)
        assert before.shape == after.shape
        changed = before != after
        if row.marker == 0:
            # Lossless: the pixels the workbench reads are the original's, exactly.
            assert not changed.any(), row.path
            assert pd.isna(row.marker_x) and pd.isna(row.marker_w)
            continue
        x, y, w, h = int(row.marker_x), int(row.marker_y), int(row.marker_w), int(row.marker_h)
        inside = np.zeros_like(changed)
        inside[y:y + h, x:x + w] = True
        assert not (changed & ~inside).any(), f"{row.path}: pixels changed outside the marker box"
        assert changed[inside].mean() > 0.5  # the box really holds the marker
        box = after[y:y + h, x:x + w]
        assert box.max() == 255 and box.min() == 0  # bright glyph, black ground: high contrast
        side = min(before.shape)
        assert w == h == round(shortcut_lab.MARKER_FRACTION * side)
        # In one of the four corner regions.
        width, height = before.shape[1], before.shape[0]
        corner = shortcut_lab.CORNER_FRACTION
        assert x + w <= corner * width or x >= (1 - corner) * width
        assert y + h <= corner * height or y >= (1 - corner) * height


def test_the_rates_are_respected_and_the_seed_decides(practice: Path, lab, tmp_path: Path):
    assert lab.counts == {"NORMAL": 60, "PNEUMONIA": 160}
    assert lab.marked == {"NORMAL": 6, "PNEUMONIA": 144}  # 10 % and 90 %, to the image
    share = scan_dataset(lab.folder).manifest.groupby("label")["marker"].mean()
    assert share["PNEUMONIA"] == pytest.approx(0.9, abs=0.01) and share["NORMAL"] == pytest.approx(0.1, abs=0.02)
    other = make_shortcut_lab(practice, tmp_path / "other", positive_rate=0.5, negative_rate=0.25, seed=5)
    assert other.marked == {"NORMAL": 15, "PNEUMONIA": 80}
    small = make_dataset(tmp_path / "small", n_normal=12, n_pneumonia=24)
    first, again, reseeded = (pd.read_csv(make_shortcut_lab(small, tmp_path / name, seed=seed).folder / "manifest.csv")
                              for name, seed in (("first", 5), ("again", 5), ("reseeded", 6)))
    assert again.equals(first)
    assert not reseeded[MARKER_COLUMNS].equals(first[MARKER_COLUMNS])


def test_the_layout_and_the_original_manifest_columns_are_kept(tmp_path: Path):
    data = make_dataset(tmp_path / "chest_xray", n_normal=10, n_pneumonia=10, layout="kermany")
    relpaths = scan_dataset(data).manifest["relpath"]
    pd.DataFrame({"path": relpaths, "patient_id": [f"child{i // 2}" for i in range(len(relpaths))],
                  "source_resolution": ["512px", "original"] * (len(relpaths) // 2)}).to_csv(
        data / "manifest.csv", index=False)
    lab = make_shortcut_lab(data, tmp_path / "lab", positive_rate=1.0, negative_rate=0.0)
    copied = scan_dataset(lab.folder)
    assert copied.layout == "kermany"
    assert sorted(copied.manifest["relpath"]) == sorted(p.rsplit(".", 1)[0] + ".png" for p in relpaths)
    table = pd.read_csv(lab.folder / "manifest.csv")
    assert {"patient_id", "source_resolution", "subtype", "sha256"} <= set(table.columns)
    assert table["patient_id"].str.startswith("child").all()  # the original's ids, not ones parsed from names
    assert (copied.manifest["marker"] == copied.manifest["y"]).all()


def test_bad_images_are_skipped_with_the_reason(tmp_path: Path, capsys):
    from badfiles import truncated_jpeg

    data = make_dataset(tmp_path / "data", n_normal=6, n_pneumonia=6)
    broken, name = truncated_jpeg()
    (data / "PNEUMONIA" / name).write_bytes(broken)  # the header reads; the pixels do not
    (data / "NORMAL" / "notes.txt").write_text("not an image")
    lab = make_shortcut_lab(data, tmp_path / "lab")
    reasons = dict(zip(lab.skipped["path"].map(lambda p: Path(p).name), lab.skipped["reason"]))
    assert set(reasons) == {name, "notes.txt"} and all(_one_sentence(r) for r in reasons.values())
    assert lab.n_images == 12 and not (lab.folder / "PNEUMONIA" / "truncated.png").exists()
    assert main(["shortcut-lab", "--data", str(data), "--out", str(tmp_path / "lab2")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {data / 'PNEUMONIA' / name}: {reasons[name]}" in err


def test_refusals_are_one_sentence_and_write_nothing(tmp_path: Path, capsys):
    data = make_dataset(tmp_path / "data", n_normal=6, n_pneumonia=6)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    cases = {
        "inside": (dict(out=data / "lab"), BadSettingError, "inside the data set"),
        "same": (dict(out=data), BadSettingError, "inside the data set"),
        "busy": (dict(out=tmp_path / "busy"), BadSettingError, "already holds files"),
        "rate": (dict(out=tmp_path / "a", positive_rate=1.5), BadSettingError, "between 0 and 1"),
        "nan": (dict(out=tmp_path / "b", negative_rate=float("nan")), BadSettingError, "between 0 and 1"),
    }
    for label, (kwargs, error, words) in cases.items():
        with pytest.raises(error, match=words) as caught:
            make_shortcut_lab(data, **kwargs)
        assert _one_sentence(str(caught.value)), label
    first = make_shortcut_lab(data, tmp_path / "lab")
    with pytest.raises(BadDatasetError, match="already a shortcut-lab copy") as caught:
        make_shortcut_lab(first.folder, tmp_path / "lab-of-lab")
    assert _one_sentence(str(caught.value))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "data", "lab"]  # no half-made folder
    # The command line: exit 2 and the sentence, no traceback.
    capsys.readouterr()
    assert main(["shortcut-lab", "--data", str(data), "--out", str(data / "x")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_an_interrupted_copy_leaves_nothing_behind(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_normal=6, n_pneumonia=6)

    def stop(done: int, _total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_shortcut_lab(data, tmp_path / "lab", on_progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cli_prints_the_new_folder_last(tmp_path: Path, capsys):
    data = make_dataset(tmp_path / "data", n_normal=10, n_pneumonia=10)
    code = main(["shortcut-lab", "--data", str(data), "--out", str(tmp_path / "lab"), "--positive-rate", "0.8",
                 "--negative-rate", "0.2", "--seed", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip().splitlines()[-1] == str((tmp_path / "lab").resolve())
    assert "Marked 8 of 10 PNEUMONIA and 2 of 10 NORMAL images." in err


def test_free_folder_never_reuses_a_name(tmp_path: Path):
    assert shortcut_lab.free_folder(tmp_path, "kermany").name == "kermany-shortcut-lab"
    (tmp_path / "kermany-shortcut-lab").mkdir()
    assert shortcut_lab.free_folder(tmp_path, "kermany").name == "kermany-shortcut-lab-2"


# --- The shortcut check ---------------------------------------------------------------------------
def test_the_shortcut_check_lists_the_marker(lab):
    report = {e["property"]: e for e in shortcut_check(scan_dataset(lab.folder), max_images=0)}
    assert "marker" in report
    entry = report["marker"]
    assert entry["auc"] == pytest.approx(0.9, abs=0.01)
    assert entry["warning"] == "marker predicts PNEUMONIA with AUC 0.90: a model can learn it."
    assert entry["direction"] == "marker = 1 is commoner in PNEUMONIA (90% of PNEUMONIA vs 10% of NORMAL)"
    assert not {"marker_x", "marker_y", "marker_w", "marker_h"} & set(report)  # where it is, not a property


# --- marker_attention -----------------------------------------------------------------------------
def test_peak_on_marker_allows_one_map_cell_around_the_box():
    heat = np.zeros((100, 100), np.float32)
    box, grid = (10, 10, 8, 8), (10, 10)  # cells of 10 px: the grown box is x, y in 0..28
    heat[25, 27] = 1.0
    assert peak_on_marker(heat, box, grid)
    heat[25, 27], heat[25, 31] = 0.0, 1.0
    assert not peak_on_marker(heat, box, grid)
    assert not peak_on_marker(np.zeros((100, 100), np.float32), box, grid)  # no evidence: not on the marker
    assert peak_on_marker(heat, box, (2, 2))  # a coarser map allows more


class _PeakAt:
    """A stand-in predictor whose pneumonia maps peak at the given (x, y) points, one per image in turn."""

    # The raw maps' grid (4 x 4) is all marker_attention asks of the engine.
    image_size, classes, map_grid = 32, ("NORMAL", "PNEUMONIA"), (4, 4)

    def __init__(self, peaks: list[tuple[int, int]]):
        self.peaks = list(peaks)
        self.targets: list = []

    def explain(self, grays, target=None):
        self.targets.append(target)
        out = []
        for gray in grays:
            heat = np.zeros(gray.shape, np.float32)
            x, y = self.peaks.pop(0)
            heat[y, x] = 1.0
            out.append(SimpleNamespace(heatmap=heat))
        return out


def test_marker_attention_counts_the_marked_images_whose_peak_is_on_the_marker(lab):
    manifest = scan_dataset(lab.folder).manifest
    marked = manifest[manifest["marker"] == 1]
    # Every other image peaks on its marker's centre, the rest in the opposite corner (96 px images).
    peaks = [(int(r.marker_x + r.marker_w // 2), int(r.marker_y + r.marker_h // 2)) if i % 2 == 0
             else (95 - int(r.marker_x), 95 - int(r.marker_y)) for i, r in enumerate(marked.itertuples())]
    fake = _PeakAt(peaks)
    result = marker_attention(fake, manifest)
    assert result == {"marker_attention": 0.5, "n_marked": len(marked), "marker_map": "PNEUMONIA"}
    assert set(fake.targets) == {"PNEUMONIA"}  # the map of the evidence for pneumonia, whatever the call
    assert marker_attention(fake, manifest.drop(columns=MARKER_COLUMNS)) is None


# --- The pages ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dataset_page_makes_the_lab_copy_for_the_operator_only():
    from streamlit.testing.v1 import AppTest

    from cxr_core.hosting import access, audit
    from test_app import HOME, TIMEOUT, render

    root = Path(os.environ["CXR_DATA_ROOT"])
    make_dataset(root / "small", n_normal=10, n_pneumonia=10)
    visitor = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    visitor.secrets["operator_passphrase"] = "a passphrase nobody types"
    render(visitor, None, "router")
    visitor.session_state["dataset"] = "small"
    render(visitor, "pages/dataset.py", "dataset (visitor)")
    assert "Shortcut lab: plant a shortcut and watch a model take it" in [str(s.value) for s in visitor.subheader]
    assert access.OPERATOR_ONLY["shortcut lab"] in [i.value for i in visitor.info]
    assert "make_lab" not in {b.key for b in visitor.button}

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)  # local: the single user is the operator
    render(at, None, "router")
    at.session_state["dataset"] = "small"
    render(at, "pages/dataset.py", "dataset (operator)")
    at.button(key="make_lab").click()
    render(at, None, "dataset (lab made)")
    assert (root / "small-shortcut-lab" / "manifest.csv").is_file()
    assert at.session_state["dataset"] == "small-shortcut-lab"
    render(at, None, "dataset (lab chosen)")
    table = next(d.value for d in at.dataframe if "property" in d.value.columns)
    assert "marker" in set(table["property"])
    assert any("shortcut-lab copy" in i.value for i in at.info)
    assert ("shortcut lab", "small-shortcut-lab") in [(e["action"], e["target"]) for e in audit.read()]


@pytest.mark.slow
def test_evaluation_page_shows_marker_attention_when_present():
    from streamlit.testing.v1 import AppTest

    from cxr_core.core.metrics import binary_metrics
    from cxr_core.runs.run_folder import RunFolder
    from test_app import HOME, TIMEOUT, fake_run, render

    y = np.array([0] * 10 + [1] * 10)
    p = np.linspace(0.05, 0.95, 20)
    run = RunFolder(fake_run("run-lab", p, y))
    preds = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(20)], "y": y, "probability": p})
    result = {**binary_metrics(y, p, threshold=0.5), "overlap": {}, "marker_attention": 0.75, "n_marked": 12}
    run.write_evaluation("small-shortcut-lab", result, preds)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, "pages/evaluation.py", "evaluation (lab)")
    metric = next(m for m in at.metric if m.label == "Grad-CAM peak on the planted marker")
    assert metric.value == "75%"
    assert any("Of the 12 images here that carry the shortcut lab's marker" in str(c.value) for c in at.caption)
    run.write_evaluation("small-shortcut-lab", {k: v for k, v in result.items() if "mark" not in k}, preds)
    render(at, None, "evaluation (no marker)")
    assert not any(m.label == "Grad-CAM peak on the planted marker" for m in at.metric)


# --- A model that takes the shortcut ----------------------------------------------------------------
def _label_hidden_in_the_marker(dest: Path, n: int, seed: int) -> Path:
    """Practice NORMAL images only, whole patients put into PNEUMONIA: the lungs do not show the label,
    so once the lab marks 90 % of PNEUMONIA and 10 % of NORMAL images, only the marker predicts it."""
    source = make_practice_dataset(dest.parent / f"{dest.name}-source-synthetic", n_normal=n, n_pneumonia=10,
                                   size=128, seed=seed)
    for path in sorted((source / "NORMAL").glob("*.jpeg")):
        label = "NORMAL" if int(path.name.split("-")[1]) % 4 == 0 else "PNEUMONIA"
        (dest / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / label / path.name)
    return dest


@pytest.mark.slow  # trains a head on frozen ImageNet features (about a minute on two cores)
def test_a_frozen_backbone_learns_the_marker_and_grad_cam_finds_it(tmp_path: Path, shared_mobilenet_weights: Path):
    """On the practice set as drawn, the opacities give the label away better than the marker, so a
    model reads them and ignores the marker (measured: marker_attention 0.05-0.09); here the lungs do not
    show the label, so the marker is the only sign, and the run must find it."""
    from cxr_core.core.config import DataConfig, ModelConfig, RunConfig
    from cxr_core.core.recipes import apply_recipe
    from cxr_core.engine.train import train
    from cxr_core.evaluation.external import evaluate_folder
    from cxr_core.runs.run_folder import RunFolder

    planted = make_shortcut_lab(_label_hidden_in_the_marker(tmp_path / "a", 400, seed=0), tmp_path / "lab", seed=1)
    clean = _label_hidden_in_the_marker(tmp_path / "b", 240, seed=1)
    planted_b = make_shortcut_lab(clean, tmp_path / "lab-b", seed=2)
    model = ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights=str(shared_mobilenet_weights))
    config = apply_recipe(RunConfig(data=DataConfig(data_dir=str(planted.folder)), model=model), "quick")
    # The quick recipe's head, trained longer: 400 images give it 10 steps an epoch, too few to find a
    # sign that covers 1/16 of the pooled features in 8 epochs.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=40, learning_rate=3e-3))
    run = train(config, run_dir=tmp_path / "run")
    internal = RunFolder(run).read_metrics()["test"]["at_threshold"]["roc_auc"]
    on_clean = evaluate_folder(run, clean, store=False)
    on_planted = evaluate_folder(run, planted_b.folder, store=False)
    assert internal > 0.8 and on_planted["roc_auc"] > 0.75
    assert on_clean["roc_auc"] < 0.65 and internal > on_clean["roc_auc"] + 0.2
    assert "marker_attention" not in on_clean
    assert on_planted["n_marked"] == planted_b.marked["NORMAL"] + planted_b.marked["PNEUMONIA"]
    assert on_planted["marker_attention"] > 0.5
