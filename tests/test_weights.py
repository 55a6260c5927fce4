"""Starting weights are checked before a run starts, and runs that cannot learn are refused or flagged.

Offline, choosing ImageNet used to fail ten seconds into a run with Keras' "URL fetch failure"; a
frozen backbone with random weights used to finish at AUC 0.500 and then be picked as the model.
"""
from __future__ import annotations

import dataclasses
import http.server
import io
import os
import socket
import threading
from pathlib import Path

import pytest

from conftest import TINY_MODEL, TINY_PRETRAINED, TINY_WEIGHTS, make_dataset
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadSettingError
from cxr_core.data import plan
from cxr_core.io import weights
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KERAS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def _one_sentence(text: str) -> None:
    assert "\n" not in text and text.rstrip().endswith(".") and text.count(". ") == 0, text


# -- where weights come from ------------------------------------------------------------------------
def test_imagenet_offline_and_not_cached_is_one_sentence_naming_the_file_and_the_ways_out():
    with pytest.raises(BadSettingError) as caught:
        weights.check_weights("mobilenet_v2", "imagenet", alpha=0.35, image_size=224, probe=lambda: False)
    text = str(caught.value)
    _one_sentence(text)
    assert KERAS_FILE in text and str(weights.keras_cache_dir()) in text
    assert "--weights PATH" in text and "--weights none --fine-tune-layers -1" in text


def test_imagenet_cached_needs_no_network_and_reachable_host_means_download():
    assert weights.check_weights("mobilenet_v2", "imagenet", 0.35, 224, probe=lambda: True) == "download"
    cache = weights.keras_cache_dir()
    cache.mkdir(parents=True)
    (cache / KERAS_FILE).write_bytes(weights.HDF5_SIGNATURE + b"rest")
    probed = []
    assert weights.check_weights("mobilenet_v2", "imagenet", 0.35, 224,
                                 probe=lambda: probed.append(1) or False) == "cached"
    assert not probed  # a cached file is enough: no network probe at all
    # Keras' file name for another size is another file.
    with pytest.raises(BadSettingError):
        weights.check_weights("mobilenet_v2", "imagenet", 0.35, 128, probe=lambda: False)


def test_weights_file_must_exist_and_be_hdf5(tmp_path):
    with pytest.raises(BadSettingError, match="does not exist"):
        weights.check_weights("mobilenet_v2", str(tmp_path / "missing.h5"))
    fake = tmp_path / "fake.weights.h5"
    fake.write_text("not hdf5")
    with pytest.raises(BadSettingError, match="not a Keras weights file"):
        weights.check_weights("mobilenet_v2", str(fake))
    assert weights.check_weights("mobilenet_v2", str(TINY_WEIGHTS)) == "file"
    assert weights.check_weights("mobilenet_v2", "none") == "none"


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 404

    def do_HEAD(self):
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def test_reachable_probes_a_real_server_and_a_closed_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tensorflow/keras-applications/"
        assert weights.reachable(url, timeout=5)  # a 404 for the folder address: the host is there
        _Answer.status = 200
        assert weights.reachable(url, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert not weights.reachable(f"http://127.0.0.1:{closed}/", timeout=2)
    assert not weights.reachable("not a url", timeout=2)
    # The tests' environment points the probe at a closed port (conftest), so nothing reaches the internet.
    assert not weights.reachable(timeout=2)


def test_weight_files_are_found_in_the_weights_folder_and_keras_cache():
    folder = Path(os.environ["CXR_WEIGHTS_DIR"])
    folder.mkdir(parents=True)
    (folder / "mobilenet_v2_0.35_224_no_top_imagenet.weights.h5").write_bytes(weights.HDF5_SIGNATURE)
    (folder / "notes.txt").write_text("ignored")
    cache = weights.keras_cache_dir()
    cache.mkdir(parents=True)
    (cache / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(weights.HDF5_SIGNATURE)
    (cache / "efficientnetb0_notop.h5").write_bytes(weights.HDF5_SIGNATURE)
    found = {f.path.name: f for f in weights.find_weight_files()}
    assert set(found) == {"mobilenet_v2_0.35_224_no_top_imagenet.weights.h5",
                          "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "efficientnetb0_notop.h5"}
    mobile = found["mobilenet_v2_0.35_224_no_top_imagenet.weights.h5"]
    assert (mobile.backbone, mobile.alpha, mobile.source) == ("mobilenet_v2", 0.35, "weights folder")
    assert found["inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"].source == "Keras cache"
    assert found["efficientnetb0_notop.h5"].backbone == "efficientnet_b0"
    assert weights.find_weight_files()[0].source == "weights folder"  # the user's own files first


def test_an_uploaded_weights_file_is_kept_whole_and_inside_the_folder(tmp_path):
    content = weights.HDF5_SIGNATURE + os.urandom(3 << 20)  # several read chunks
    saved = weights.save_upload("../../evil/mobilenet_v2_0.35.weights.h5", io.BytesIO(content), tmp_path,
                                chunk=1 << 20)
    assert saved == tmp_path / "mobilenet_v2_0.35.weights.h5" and saved.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mobilenet_v2_0.35.weights.h5"]  # no temp left
    with pytest.raises(BadSettingError, match="must end in .h5"):
        weights.save_upload("model.keras", io.BytesIO(content), tmp_path)
    with pytest.raises(BadSettingError, match="not HDF5"):
        weights.save_upload("x.h5", io.BytesIO(b"PK\x03\x04 a zip"), tmp_path)
    assert not (tmp_path / "x.h5").exists()


def test_build_backbone_turns_a_failed_imagenet_download_into_one_sentence(monkeypatch):
    from cxr_core.engine import model as model_lib

    def offline(**_kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(model_lib, "constructor", lambda _spec: offline)
    with pytest.raises(BadSettingError) as caught:
        model_lib.build_backbone(dataclasses.replace(TINY_MODEL, weights="imagenet"))
    _one_sentence(str(caught.value))
    assert "could not be downloaded" in str(caught.value)


# -- runs that cannot learn ------------------------------------------------------------------------
def test_a_frozen_backbone_with_random_weights_is_refused():
    frozen = RunConfig(model=TINY_MODEL, train=TrainConfig(fine_tune_layers=0))
    with pytest.raises(BadSettingError) as caught:
        plan.preflight(frozen)
    _one_sentence(str(caught.value))
    # Fine-tuning layers for zero epochs is frozen too.
    with pytest.raises(BadSettingError):
        plan.check_can_learn(RunConfig(model=TINY_MODEL, train=TrainConfig(fine_tune_layers=-1, fine_tune_epochs=0)))
    # Training the whole network from scratch, or starting from a file, is fine.
    plan.check_can_learn(RunConfig(model=TINY_MODEL, train=TrainConfig(fine_tune_layers=-1, fine_tune_epochs=2)))
    assert plan.preflight(RunConfig(model=TINY_PRETRAINED)) == "file"


@pytest.mark.parametrize(("flags", "expected"), [
    (["--weights", "imagenet"], KERAS_FILE),  # Keras' file for sizes it has no file of is the 224 one
    (["--weights", "none"], "cannot learn while it stays frozen"),
])
def test_cli_refuses_before_any_run_folder_exists(tmp_path, capsys, flags, expected):
    from cxr_core import cli

    data = make_dataset(tmp_path / "data", n_normal=4, n_pneumonia=4)
    out = tmp_path / "runs"
    code = cli.main(["train", "--data", str(data), "--out", str(out), "--backbone", "mobilenet_v2", "--alpha", "0.35",
                     "--image-size", "32", "--epochs", "1", *flags])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "URL fetch" not in err
    assert not out.exists() or not any(out.iterdir())


def test_train_marks_a_run_that_cannot_learn_failed_with_the_sentence(tmp_path):
    from cxr_core.engine import train

    data = make_dataset(tmp_path / "data", n_normal=4, n_pneumonia=4)
    config = RunConfig(data=DataConfig(data_dir=str(data)), model=TINY_MODEL, train=TrainConfig(epochs=1))
    with pytest.raises(BadSettingError):
        train.train(config, run_dir=tmp_path / "run")
    status = runs.read_status(tmp_path / "run")
    assert status["state"] == "failed" and "cannot learn" in status["message"]


def _finished_run(root: Path, name: str, val_auc: float, started: float) -> Path:
    """A run folder that reads as done (a model file is present) with the given validation AUC."""
    folder = RunFolder(root / name)
    folder.path.mkdir(parents=True)
    folder.write_config(RunConfig(data=DataConfig(data_dir="/data/x"), model=TINY_PRETRAINED))
    folder.write_metrics({"threshold": 0.5, "val": {"roc_auc": val_auc},
                          "test": {"at_threshold": {"roc_auc": val_auc}}})
    folder.model_path.write_bytes(b"model")
    folder.write_status("done", started=started, finished=started + 10, message="done")
    return folder.path


def test_a_run_near_chance_is_flagged_and_never_picked_by_default(tmp_path, monkeypatch):
    useful = _finished_run(tmp_path, "a-useful", 0.91, started=1000.0)
    useless = _finished_run(tmp_path, "b-useless", 0.52, started=2000.0)  # newer
    summaries = {s.run_id: s for s in runs.list_runs(tmp_path, include_demo=False)}
    assert summaries["b-useless"].learned_nothing and not summaries["a-useful"].learned_nothing
    warning = summaries["b-useless"].warning
    _one_sentence(warning)
    assert "0.52" in warning
    assert summaries["b-useless"].as_row()["status"] == "learned nothing"
    assert runs.near_chance(0.41) and runs.near_chance(0.59) and not runs.near_chance(0.39)
    assert not runs.near_chance(None) and not runs.near_chance(float("nan"))

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(PROJECT_ROOT / "Home.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/evaluation.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.selectbox(key="eval_run")
    assert picker.value == str(useful)  # the newest run learned nothing: the useful one is chosen
    assert "learned nothing" in picker.format_func(str(useless))
    assert not any("learned nothing" in w.value for w in at.warning)
    picker.set_value(str(useless))
    at.run()
    assert any("learned nothing" in w.value and "0.52" in w.value for w in at.warning)
