"""Bad input: one clear sentence, the rest of the work goes on, nothing lost.

Every bad input of ``tests/badfiles.py`` goes through the library (``load_gray``, ``scan_dataset``,
``safe_extract_zip``, ``Predictor.from_run``), the command line (``python -m cxr_core``) and the
pages (Streamlit ``AppTest``). A refusal is a ``CxrError`` whose text is one line naming the file,
never a traceback; the good inputs beside it are still answered.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import badfiles
from conftest import TINY_MODEL, TINY_PRETRAINED, TINY_WEIGHTS, make_dataset
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadDatasetError, BadImageError, BadRunError, CxrError
from cxr_core.data import scan as data
from cxr_core.data.download import safe_extract_zip
from cxr_core.hosting import resources
from cxr_core.io.images import image_header, load_gray
from cxr_core.runs import registry as runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME = str(PROJECT_ROOT / "Home.py")
TIMEOUT = 120


def assert_one_sentence(message: str, *names: str) -> None:
    """A message for a person: one line, no traceback, names what it is about, ends like a sentence."""
    assert message and "\n" not in message, repr(message)
    assert "Traceback" not in message and 'File "' not in message, message
    assert message.rstrip().endswith((".", ")")), message
    for name in names:
        assert name in message, (name, message)


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "cxr_core", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env=env)


def write_all(folder: Path, makers) -> dict[str, Path]:
    """Write every maker's file into ``folder``; returns {key: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, maker in makers.items():
        payload, name = maker() if callable(maker) else maker[0]()
        path = folder / name
        path.write_bytes(payload)
        written[key] = path
    return written


# =============================================================================================
# Library: images
# =============================================================================================


BOMBS = {"20000x20000_header", "decompression_bomb", "decompression_bomb_rgba"}


@pytest.mark.parametrize("key", list(badfiles.REFUSED))
def test_bad_image_is_refused_with_one_sentence(key, tmp_path):
    maker, pattern = badfiles.REFUSED[key]
    payload, name = maker()
    path = tmp_path / name
    path.write_bytes(payload)
    for source, kwargs in ((payload, {"name": name}), (path, {})):
        start = time.perf_counter()
        with pytest.raises(BadImageError, match=pattern) as info:
            load_gray(source, **kwargs)
        elapsed = time.perf_counter() - start
        assert_one_sentence(str(info.value), name)
        if key in BOMBS:  # refused from the header, never decoded
            assert elapsed < 0.5, f"{key} took {elapsed:.2f} s to refuse"
    if key != "truncated_jpeg":  # a truncated body is only found by decoding; its header is fine
        with pytest.raises(BadImageError) as info:
            image_header(path)
        assert_one_sentence(str(info.value), name)


def test_accepted_odd_images_decode():
    gradient = badfiles.gradient().astype(int)
    alpha = load_gray(*badfiles.png_with_alpha())
    assert alpha.shape == (40, 60) and alpha.dtype == np.uint8
    assert np.abs(alpha.astype(int) - gradient).max() <= 1  # alpha dropped, not blended with black
    deep = load_gray(*badfiles.png_16bit())
    assert deep.dtype == np.uint8 and deep.min() == 0 and deep.max() == 255  # stretched, not clipped to 0/255
    assert len(np.unique(deep)) > 50
    cmyk = load_gray(*badfiles.cmyk_jpeg())
    assert cmyk.shape == (40, 60) and np.abs(cmyk.astype(int) - gradient).mean() < 6
    mono1 = load_gray(*badfiles.dicom_monochrome1())
    mono2 = load_gray(*badfiles.dicom_monochrome2())
    assert mono1.shape == (32, 64)
    np.testing.assert_array_equal(mono1, 255 - mono2)  # MONOCHROME1 is inverted: bone stays bright
    assert mono1[0, 0] == 255 and mono1[0, -1] == 0


BOMB_PROBE = r"""
import json, resource, sys, time
from cxr_core.core.errors import BadImageError
from cxr_core.io.images import image_header, load_gray
results = {}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    refused = []
    for fn in (image_header, load_gray):
        try:
            fn(data, name=path.rsplit("/", 1)[-1])
        except BadImageError as error:
            refused.append(str(error))
    results[path] = {"seconds": time.perf_counter() - start, "refused": refused,
                     "maxrss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
print(json.dumps(results))
"""


def test_bombs_are_refused_quickly_without_allocating(tmp_path):
    """20000 x 20000 (header only) and real 64 M / 81 M pixel bombs: refused in well under a second
    and the process's peak memory does not grow (measured in a fresh process, so the baseline is low)."""
    paths = []
    for maker in (badfiles.huge_png_header, badfiles.decompression_bomb, badfiles.decompression_bomb_rgba):
        payload, name = maker()
        (tmp_path / name).write_bytes(payload)
        paths.append(str(tmp_path / name))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    out = subprocess.run([sys.executable, "-c", BOMB_PROBE, *paths], capture_output=True, text=True, env=env,
                         timeout=120, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr
    for path, result in json.loads(out.stdout).items():
        assert len(result["refused"]) == 2, (path, result)
        for message in result["refused"]:
            assert_one_sentence(message, Path(path).name)
        assert result["seconds"] < 0.5, (path, result)
        assert result["maxrss_mb"] < 100, (path, result)  # the RGBA bomb would be 324 MB decoded


# =============================================================================================
# Library: data set folders
# =============================================================================================


def _unknown_names(root: Path) -> Path:
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        (root / name / "a.png").write_bytes(badfiles.good_png()[0])
    return root


def _one_class(root: Path) -> Path:
    make_dataset(root, n_normal=4, n_pneumonia=4, size=32)
    shutil.rmtree(root / "NORMAL")
    return root


def _only_bad_images(root: Path) -> Path:
    write_all(root / "NORMAL", {"t": badfiles.text_named_jpg})
    write_all(root / "PNEUMONIA", {"e": badfiles.empty_file})
    return root


def _loose_images(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(badfiles.good_png()[0])
    return root


def _a_file(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_bytes(b"PK\x03\x04 not really a zip")
    return root


BAD_FOLDERS = {
    "missing": (lambda root: root, r"does not exist"),
    "empty": (lambda root: (root.mkdir(parents=True), root)[1], r"is empty of data"),
    "one_class": (_one_class, r"has PNEUMONIA images only"),
    "unknown_class_names": (_unknown_names, r"holds the folders cats, dogs, but a data set needs NORMAL"),
    "only_unreadable_images": (_only_bad_images, r"no usable images \(2 files could not be read\)"),
    "images_without_class_folders": (_loose_images, r"holds images but no class folders"),
    "a_file_not_a_folder": (_a_file, r"is a file, not a folder"),
}


@pytest.mark.parametrize("key", list(BAD_FOLDERS))
def test_bad_dataset_folder_is_one_sentence(key, tmp_path):
    make, pattern = BAD_FOLDERS[key]
    root = make(tmp_path / "bad")
    with pytest.raises(BadDatasetError, match=pattern) as info:
        data.scan_dataset(root)
    assert_one_sentence(str(info.value))


def test_bad_files_inside_a_dataset_are_skipped_and_the_rest_is_kept(tmp_path):
    root = make_dataset(tmp_path / "mixed", n_normal=6, n_pneumonia=6, size=32)
    bad = write_all(root / "NORMAL", badfiles.REFUSED)
    odd = write_all(root / "PNEUMONIA", badfiles.ACCEPTED)
    result = data.scan_dataset(root)
    skipped = dict(zip(result.skipped["path"], result.skipped["reason"]))
    kept = set(result.manifest["path"])
    for key, path in bad.items():
        if key == "truncated_jpeg":
            continue  # only decoding finds it (training lists it in skipped.csv; see below)
        assert str(path.absolute()) in skipped, key
        assert_one_sentence(skipped[str(path.absolute())], path.name)
    for key, path in odd.items():
        assert str(path.absolute()) in kept, key
    assert len(kept) >= 12 + len(odd)


def test_nested_folders_and_symlinked_files_work_and_a_symlink_loop_does_not_hang(tmp_path):
    root = make_dataset(tmp_path / "nested", n_normal=4, n_pneumonia=4, size=32)
    deep = root / "NORMAL" / "ward-a" / "2019" / "march"
    deep.mkdir(parents=True)
    (deep / "IM-0900-0001.png").write_bytes(badfiles.good_png(seed=9)[0])
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    (elsewhere / "person77_virus_1.png").write_bytes(badfiles.good_png(seed=10)[0])
    (root / "PNEUMONIA" / "person77_virus_1.png").symlink_to(elsewhere / "person77_virus_1.png")
    (root / "NORMAL" / "ward-a" / "loop").symlink_to(root / "NORMAL", target_is_directory=True)  # a cycle
    (root / "PNEUMONIA" / "self.png").symlink_to(root / "PNEUMONIA" / "self.png")  # a link to itself
    (root / "PNEUMONIA" / "dangling.png").symlink_to(tmp_path / "gone.png")

    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=data.scan_dataset(root)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "scan_dataset hangs on a symlink loop"
    result = box["result"]
    relpaths = set(result.manifest["relpath"])
    assert "NORMAL/ward-a/2019/march/IM-0900-0001.png" in relpaths
    assert "PNEUMONIA/person77_virus_1.png" in relpaths
    manifest = result.manifest
    assert manifest.loc[manifest["relpath"] == "PNEUMONIA/person77_virus_1.png", "label"].item() == "PNEUMONIA"
    assert len(result.manifest) == 10  # nothing counted twice through the loop
    reasons = dict(zip(result.skipped["path"].map(lambda p: Path(p).name), result.skipped["reason"]))
    for name in ("self.png", "dangling.png"):
        assert name in reasons
        assert_one_sentence(reasons[name], name)


@pytest.mark.parametrize("mode", ["random", "patient"])
def test_duplicates_are_reported_and_never_on_two_sides_of_a_split(tmp_path, mode):
    root = make_dataset(tmp_path / "dups", n_normal=20, n_pneumonia=30, size=32)
    normal = sorted((root / "NORMAL").iterdir())
    pneumonia = sorted((root / "PNEUMONIA").iterdir())
    copies = {
        root / "NORMAL" / "IM-0500-0001.jpeg": normal[0],         # same class, another "patient"
        root / "NORMAL" / "IM-0501-0001.jpeg": normal[3],
        root / "PNEUMONIA" / "person90_virus_1.jpeg": pneumonia[2],
        root / "PNEUMONIA" / "person91_bacteria_2.jpeg": normal[5],  # same bytes under the other label
    }
    for target, source in copies.items():
        target.write_bytes(source.read_bytes())
    result = data.scan_dataset(root)
    assert len(result.duplicates) == len(copies)
    reported = set(zip(result.duplicates["path"], result.duplicates["duplicate_of"]))
    for target, source in copies.items():
        pair = tuple(sorted([str(target.absolute()), str(source.absolute())]))
        assert (pair[1], pair[0]) in reported, target.name  # the later path is the duplicate
    assert result.duplicates["label_conflict"].sum() == 1
    assert result.manifest["sha256"].is_unique
    split = data.make_split(result.manifest, mode=mode, seed=123)
    digests = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in split["path"]}
    split = split.assign(actual=split["path"].map(digests))
    assert (split.groupby("actual")["split"].nunique() == 1).all()
    for target in copies:
        paths = set(split["path"])
        assert str(target.absolute()) not in paths or str(copies[target].absolute()) not in paths


@pytest.mark.slow
def test_training_goes_on_past_bad_files_and_lists_them(tmp_path):
    """A data set with every bad file in it still trains; each bad file is listed with its sentence."""
    from cxr_core.engine.train import train

    root = make_dataset(tmp_path / "mixed", n_normal=20, n_pneumonia=20, size=32)
    bad = write_all(root / "NORMAL", badfiles.REFUSED)
    config = RunConfig(data=DataConfig(data_dir=str(root), split="random"), model=TINY_PRETRAINED,
                       train=TrainConfig(epochs=1, batch_size=16, balance="none", cache_dir=str(tmp_path / "cache")))
    run = train(config, run_dir=tmp_path / "run")
    assert runs.read_status(run)["state"] == "done"
    import pandas as pd

    skipped = pd.read_csv(run / "skipped.csv")
    listed = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"]))
    for key, path in bad.items():
        assert path.name in listed, key
        assert_one_sentence(listed[path.name], path.name)


# =============================================================================================
# Library: zip uploads
# =============================================================================================


@pytest.mark.parametrize("key", list(badfiles.HOSTILE_ZIPS))
@pytest.mark.parametrize("as_file", [True, False], ids=["upload", "path"])
def test_hostile_zip_is_refused_and_nothing_is_extracted(key, as_file, tmp_path):
    maker, pattern = badfiles.HOSTILE_ZIPS[key]
    payload, name = maker()
    parent = tmp_path / "data"
    parent.mkdir()
    archive = tmp_path / name
    archive.write_bytes(payload)
    absolute_escape = Path("/tmp/cxr-absolute-escape.txt")
    existed = absolute_escape.exists()
    source = io.BytesIO(payload) if as_file else archive
    with pytest.raises(BadDatasetError, match=pattern) as info:
        safe_extract_zip(source, parent / "unpacked")
    assert_one_sentence(str(info.value))
    assert list(parent.iterdir()) == []  # neither the folder nor a hidden half-extracted one
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", name])  # nothing escaped '..'
    assert absolute_escape.exists() == existed


def test_zip_over_a_small_size_limit_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("NORMAL/a.png", badfiles.good_png()[0])
        archive.writestr("PNEUMONIA/b.png", os.urandom(4096))
    with pytest.raises(BadDatasetError, match=r"more than the .* allowed; it was not extracted\.") as info:
        safe_extract_zip(io.BytesIO(buffer.getvalue()), tmp_path / "out", max_total_bytes=1000)
    assert_one_sentence(str(info.value))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadDatasetError, match="not a zip archive") as info:
        safe_extract_zip(io.BytesIO(b"this is not a zip"), tmp_path / "out")
    assert_one_sentence(str(info.value))


# =============================================================================================
# Library: run folders
# =============================================================================================


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A loadable run folder: an untrained tiny classifier saved as a training run would save it."""
    from cxr_core.engine import model as model_lib
    from cxr_core.io.atomic import write_json_atomic

    base = tmp_path_factory.mktemp("bad-input-run")
    run = base / "tiny-run"
    run.mkdir()
    config = RunConfig(data=DataConfig(data_dir=str(base / "data")), model=TINY_MODEL)
    model_lib.build_classifier(TINY_MODEL, seed=1).save(run / "model.keras")
    write_json_atomic(run / "config.json", config.to_dict())
    write_json_atomic(run / "metrics.json", {"threshold": 0.5})
    write_json_atomic(run / "status.json", {"state": "done", "pid": 0, "message": "done"})
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _config_dict(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_run_without_model_or_config_is_one_sentence(run_copy):
    from cxr_core.inference.predictor import Predictor

    (run_copy / "model.keras").unlink()
    with pytest.raises(BadRunError, match="has no model.keras") as info:
        Predictor.from_run(run_copy)
    assert_one_sentence(str(info.value), str(run_copy))
    (run_copy / "config.json").unlink()
    with pytest.raises(BadRunError, match="has no config.json") as info:
        Predictor.from_run(run_copy)
    assert_one_sentence(str(info.value), str(run_copy))
    (run_copy / "config.json").write_text("{not json")
    with pytest.raises(BadRunError, match="not valid JSON") as info:
        Predictor.from_run(run_copy)
    assert_one_sentence(str(info.value))
    with pytest.raises(BadRunError, match="does not exist"):
        Predictor.from_run(run_copy / "nope")


@pytest.mark.slow  # builds or loads models: seconds
def test_config_from_an_older_version_still_loads(run_copy, tiny_run):
    from cxr_core.inference.predictor import Predictor

    old = _config_dict(run_copy)
    model = {k: v for k, v in old["model"].items() if k in ("backbone", "alpha", "weights", "image_size")}
    model["input_normalisation"] = "legacy"  # a key this version does not know
    legacy = {
        "version": 0,
        "model": model,                                   # some keys missing
        "data": {"data_dir": "/old/place", "class_names": ["NORMAL", "PNEUMONIA"]},  # an unknown key
        "experiment_tracker": {"name": "mlflow"},          # an unknown section
    }                                                      # no "train" nor "augment" section at all
    (run_copy / "config.json").write_text(json.dumps(legacy))
    (run_copy / "metrics.json").unlink()                  # old runs may lack metrics: threshold 0.5
    predictor = Predictor.from_run(run_copy)
    assert predictor.config.version == 0
    assert predictor.config.model.backbone == "mobilenet_v2" and predictor.image_size == 32
    assert predictor.threshold == 0.5
    # The same network as the run with the current config.json: the same probability.
    current = Predictor.from_run(tiny_run).predict([badfiles.gradient(48, 48)])[0].probability
    assert predictor.predict([badfiles.gradient(48, 48)])[0].probability == pytest.approx(current, abs=1e-6)
    # A config.json with no version key at all reads as version 0 too.
    del legacy["version"]
    (run_copy / "config.json").write_text(json.dumps(legacy))
    assert Predictor.from_run(run_copy).config.version == 0


@pytest.mark.parametrize("content", ["text", "truncated", "empty"])
def test_model_file_that_is_not_a_model_is_bad_run_error(run_copy, content):
    from cxr_core.inference.predictor import Predictor

    model = run_copy / "model.keras"
    if content == "text":
        model.write_text("this is not a model, just text\n")
    elif content == "truncated":  # what a kill while saving would leave without the atomic rename
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    else:
        model.write_bytes(b"")
    with pytest.raises(BadRunError, match="cannot be loaded as a Keras model") as info:
        Predictor.from_run(run_copy)
    assert_one_sentence(str(info.value), str(run_copy))


def test_model_with_a_lambda_layer_is_refused_and_its_code_never_runs(run_copy, tmp_path):
    """Keras safe mode: a Lambda layer (marshalled Python bytecode) is refused at loading; nothing
    is unpickled or executed. The lambda would create a marker file if it ever ran."""
    import keras

    from cxr_core.inference.predictor import Predictor

    marker = tmp_path / "lambda-ran"
    # A real lambda (not a named function), so Keras stores its bytecode; the path is a literal in it.
    evil = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")  # noqa: S307
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(evil, name="evil")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    (run_copy / "model.keras").unlink()
    model.save(run_copy / "model.keras")
    marker.unlink(missing_ok=True)  # building the model called the lambda once; start clean
    with pytest.raises(BadRunError, match="cannot be loaded as a Keras model") as info:
        Predictor.from_run(run_copy)
    assert_one_sentence(str(info.value))
    assert not marker.exists(), "the Lambda layer's code ran while loading"
    # The refusal is safe mode itself: loading without it would run the lambda.
    unsafe = keras.models.load_model(run_copy / "model.keras", compile=False, safe_mode=False)
    unsafe(np.zeros((1, 32, 32, 3), np.float32))
    assert marker.exists(), "the probe is wrong: the lambda never runs even without safe mode"


# =============================================================================================
# Command line
# =============================================================================================


@pytest.mark.slow  # a CLI process that loads TensorFlow
def test_cli_predict_answers_every_good_file_and_one_line_per_bad_file(tiny_run, tmp_path):
    good = write_all(tmp_path / "good", {"chest": badfiles.good_png, **badfiles.ACCEPTED})
    bad = write_all(tmp_path / "bad", badfiles.REFUSED)
    bad["missing"] = tmp_path / "bad" / "not-there.png"
    order = [good["chest"], *bad.values(), *[p for k, p in good.items() if k != "chest"]]
    result = run_cli("predict", "--run", str(tiny_run), *map(str, order))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in order]
    by_file = {line["file"]: line for line in lines}
    from cxr_core.inference.predictor import Predictor

    expected = {r["file"]: r for r in Predictor.from_run(tiny_run).predict_files([str(p) for p in good.values()])}
    for path in good.values():
        line = by_file[str(path)]
        assert set(line) == {"file", "probability", "label"}, line
        assert line["probability"] == pytest.approx(expected[str(path)]["probability"], abs=1e-5)
        assert line["label"] == expected[str(path)]["label"]
    for path in bad.values():
        line = by_file[str(path)]
        assert set(line) == {"file", "error"}, line
        assert_one_sentence(line["error"], path.name)


def test_cli_predict_with_a_bad_run_folder(run_copy, tmp_path):
    (run_copy / "model.keras").unlink()
    image = tmp_path / "chest.png"
    image.write_bytes(badfiles.good_png()[0])
    result = run_cli("predict", "--run", str(run_copy), str(image))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "has no model.keras" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # a `python -m cxr_core train` process each
@pytest.mark.parametrize("key", ["missing", "empty", "one_class", "unknown_class_names", "only_unreadable_images"])
def test_cli_train_on_a_bad_folder_exits_2_with_one_line(key, tmp_path):
    make, pattern = BAD_FOLDERS[key]
    root = make(tmp_path / "bad")
    result = run_cli("train", "--data", str(root), "--out", str(tmp_path / "runs"), "--backbone", "mobilenet_v2",
                     "--weights", str(TINY_WEIGHTS), "--image-size", "32", "--epochs", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert_one_sentence(result.stderr.strip()[len("error: "):])


    assert re.search(pattern, result.stderr), result.stderr
    # The failed attempt is recorded as failed, never as done, and has no model.
    for run in (tmp_path / "runs").iterdir() if (tmp_path / "runs").is_dir() else []:
        assert runs.read_status(run)["state"] == "failed"
        assert not (run / "model.keras").exists()


# =============================================================================================
# Pages (AppTest)
# =============================================================================================


def render(at, page: str | None = None):
    if page:
        at.switch_page(page)
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def new_app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    return render(at)


def data_root() -> Path:
    return Path(os.environ["CXR_DATA_ROOT"])


@pytest.mark.slow  # about 7 s: every bad upload through the Predict page
def test_predict_page_one_error_per_bad_upload_and_results_for_the_good(tiny_run):
    shutil.copytree(tiny_run, Path(os.environ["CXR_RUNS_DIR"]) / tiny_run.name)
    uploads = {"chest": badfiles.good_png(), **{k: m() for k, m in badfiles.ACCEPTED.items()}}
    refused = {k: m() for k, (m, _) in badfiles.REFUSED.items()}
    files = [(name, payload, "application/octet-stream")
             for payload, name in [uploads["chest"], *refused.values(),
                                   *[v for k, v in uploads.items() if k != "chest"]]]
    n_accepted = len(badfiles.ACCEPTED)
    files = files[:2] + files[-n_accepted:] + files[2:-n_accepted]  # good ones among the first 12
    at = new_app()
    render(at, "pages/predict.py")
    at.file_uploader(key="predict_upload").set_value(files)
    render(at)
    errors = [str(e.value) for e in at.error]
    assert len(errors) == len(refused), errors
    for (_payload, name), message in zip(refused.values(), errors):
        assert_one_sentence(message, name)
    table = at.dataframe[0].value
    assert list(table["file"]) == [name for name, _, _ in files]
    good_names = [name for _, name in uploads.values()]
    answered = table[table["file"].isin(good_names)]
    assert len(answered) == len(uploads)
    assert answered["probability"].between(0, 1).all() and answered["label"].isin(["NORMAL", "PNEUMONIA"]).all()
    assert (answered["error"] == "").all()
    failed = table[~table["file"].isin(good_names)]
    assert failed["probability"].isna().all() and (failed["error"] != "").all()
    assert len(at.image) >= 2 * len(uploads)  # each good file: the X-ray and its Grad-CAM overlay


@pytest.mark.parametrize("key", ["empty", "one_class", "unknown_class_names", "only_unreadable_images"])
def test_dataset_page_shows_one_sentence_for_a_bad_folder(key):
    make, pattern = BAD_FOLDERS[key]
    folder = make(data_root() / f"bad-{key}")
    expected = None
    try:
        data.scan_dataset(folder)
    except CxrError as error:
        expected = str(error)
    assert expected is not None
    at = new_app()
    at.session_state["dataset"] = folder.name
    render(at, "pages/dataset.py")
    assert [str(e.value) for e in at.error] == [expected]
    assert_one_sentence(expected)


@pytest.mark.parametrize("key", list(badfiles.HOSTILE_ZIPS))
def test_dataset_page_refuses_a_hostile_zip_upload(key):
    maker, pattern = badfiles.HOSTILE_ZIPS[key]
    payload, name = maker()
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    at = new_app()
    render(at, "pages/dataset.py")
    at.file_uploader(key="dataset_zip").set_value((name, payload, "application/zip"))
    render(at)
    next(b for b in at.button if b.label.startswith("Unpack into the data folder")).click()
    render(at)
    errors = [str(e.value) for e in at.error]
    assert len(errors) == 1, errors
    assert_one_sentence(errors[0])


    assert re.search(pattern, errors[0]), errors[0]
    # Nothing extracted, no hidden half-extracted folder, and the refused upload is gone from the disk too.
    spool = resources.spool_folder(root)
    assert [p for p in root.iterdir() if p != spool] == []
    assert list(spool.glob("*.zip")) == []
