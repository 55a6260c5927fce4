"""What a visitor of a hosted app sees: no path or size of the server, only the choices they can make, and
one sentence when a link names a run or data set that is not here. The operator (and the single user of a
local app) still sees the server's folders and memory.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_WEIGHTS, make_dataset
from cxr_core.core.backbones import BACKBONES
from cxr_core.hosting import access
from cxr_core.io import weights
from test_app import HOME, KEY_DATASET, TIMEOUT, data_root, fake_run, render, text_of

PASSPHRASE = "a long operator passphrase 42"
UPLOAD_LABEL = "Upload a weights file..."


def hosted(page: str | None = None, **params: str) -> AppTest:
    """A visitor's first run of a hosted app (an operator passphrase in the secrets): ``page`` opened by a
    link with ``params``."""
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.secrets["operator_passphrase"] = PASSPHRASE
    at.query_params.update(params)
    render(at, page, f"{page or 'home'} (hosted, opened by a link)")
    return at


def become_operator(at: AppTest) -> None:
    at.text_input(key="access_passphrase").input(PASSPHRASE)
    render(at, None, "operator")


def server_paths() -> list[str]:
    """The server's folders a visitor must not see: the weights folder, Keras' cache, the home folder, the data root."""
    return [str(weights.upload_dir()), str(weights.keras_cache_dir()), str(Path.home()), str(data_root())]


def shown(at: AppTest) -> str:
    """Everything written on the page, help texts and option labels included."""
    parts = [text_of(at)] + [str(e.value) for e in at.exception]
    for widget in (*at.selectbox, *at.select_slider, *at.slider, *at.number_input, *at.radio, *at.text_input):
        parts += [str(getattr(widget, "label", "")), str(getattr(widget, "help", "") or "")]
    for box in at.selectbox:
        parts += [str(o) for o in box.options]
    return "\n".join(parts)


def small_set() -> str:
    make_dataset(data_root() / "small", n_normal=10, n_pneumonia=14, size=32)
    return "small"


# --- 4. No path or size of the server for a visitor -----------------------------------------------
@pytest.mark.slow
def test_a_visitor_sees_no_server_path_or_memory_and_the_operator_does():
    at = hosted()
    at.session_state[KEY_DATASET] = small_set()
    render(at, "pages/training.py", "training (visitor)")
    # The reference backbone's ImageNet weights are not on this machine and cannot be downloaded (the tests'
    # ImageNet host is a closed port): the sentence says what to do without naming the server's folders.
    assert any("ask the operator of this app to add inception_v3" in e.value for e in at.error), \
        [e.value for e in at.error]
    text = shown(at)
    for path in server_paths():
        assert path not in text, path
    assert "Keras' cache" not in text
    render(at, "pages/dataset.py", "dataset (visitor)")
    text = shown(at)
    assert "MB of memory" not in text and "takes archives up to" not in text
    assert access.OPERATOR_ONLY["unpack"] in [i.value for i in at.info]
    for path in server_paths():
        assert path not in text, path
    # The operator sees where files go and what the server can take.
    become_operator(at)
    assert "MB of memory" in text_of(at)
    assert str(data_root()) in shown(at)
    render(at, "pages/training.py", "training (operator)")
    assert str(weights.keras_cache_dir()) in at.selectbox(key="train_weights").help
    assert any(str(weights.keras_cache_dir()) in e.value for e in at.error)


def test_the_weights_help_names_the_imagenet_file_of_the_chosen_width():
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)  # a local app: its single user is the operator
    render(at, None, "router (local)")
    at.session_state[KEY_DATASET] = small_set()
    render(at, "pages/training.py", "training (local)")
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (MobileNetV2)")
    at.select_slider(key="train_alpha_free").set_value(0.35)
    render(at, None, "training (alpha 0.35)")
    size = at.select_slider(key="train_size_mobilenet_v2").value
    spec = BACKBONES["mobilenet_v2"]
    help_text = at.selectbox(key="train_weights").help
    assert spec.imagenet_filename(0.35, size) in help_text, help_text
    assert spec.imagenet_filename(1.0, size) not in help_text
    assert str(weights.keras_cache_dir()) in help_text  # the local user is the operator: the folders are shown


# --- 6. A visitor is offered only what they can do -------------------------------------------------
def test_a_visitor_is_not_offered_a_weights_upload_and_reads_one_sentence():
    weights_dir = Path(os.environ["CXR_WEIGHTS_DIR"])
    weights_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_WEIGHTS, weights_dir / "class_pretrained.weights.h5")  # named for no backbone: always listed
    # Even a link that asks for the upload leaves a visitor with the choices they have.
    at = hosted(train_weights="upload")
    at.session_state[KEY_DATASET] = small_set()
    render(at, "pages/training.py", "training (visitor)")
    choice = at.selectbox(key="train_weights")
    assert "upload" not in choice.options and UPLOAD_LABEL not in choice.options
    assert choice.value != "upload"
    infos = [i.value for i in at.info]
    assert access.OPERATOR_ONLY["weights"] not in infos
    assert not [i for i in infos if "Upload a weights file" in i] and not at.file_uploader
    said = [c.value for c in at.caption if "weights files" in c.value]
    assert said == ["Only the operator of this app can add weights files; you can start from ImageNet, a file listed "
                    "here, or random weights (None)."]
    # The operator may upload, and is not told the visitor's sentence.
    become_operator(at)
    choice = at.selectbox(key="train_weights")
    assert UPLOAD_LABEL in choice.options
    assert not [c for c in at.caption if "Only the operator of this app can add weights files" in c.value]
    choice.set_value("upload")
    render(at, None, "training (operator uploads)")
    assert at.file_uploader


# --- 9. A link to a run or data set that is not here ----------------------------------------------
@pytest.mark.slow
def test_a_link_to_a_run_the_visitor_may_not_see_says_so_and_shows_the_default():
    y = np.array([0] * 10 + [1] * 10)
    fake_run("run-shared", np.where(y == 1, 0.8, 0.2), y)
    fake_run("workspaces/b-0123456789abcdef0123/run-theirs", np.where(y == 1, 0.7, 0.3), y)  # another visitor's
    at = hosted("pages/evaluation.py", run="run-theirs")
    assert [i.value for i in at.info if "this link" in i.value] == [
        "The run in this link, `run-theirs`, is not available here; showing `run-shared` instead."]
    assert Path(at.selectbox(key="eval_run").value).name == "run-shared"
    # Said once: the next run of the page shows the default run without the sentence.
    render(at, None, "evaluation (again)")
    assert not [i for i in at.info if "this link" in i.value]
    # A run the visitor may see is taken from the link, with nothing said.
    other = hosted("pages/evaluation.py", run="run-shared")
    assert not [i for i in other.info if "this link" in i.value]


def test_a_link_to_a_data_set_that_does_not_exist_says_so():
    at = hosted("pages/dataset.py", dataset="gone-set")
    said = [i.value for i in at.info if "this link" in i.value]
    assert said == ["The data set in this link, `gone-set`, is not available here; choose a data set on the "
                    "Dataset page."]
    assert KEY_DATASET not in at.session_state or at.session_state[KEY_DATASET] is None
    # With one data set here, it is chosen instead, and the sentence names it. A crafted name stays plain text.
    small_set()
    again = hosted("pages/dataset.py", dataset="[click](https://example.org)")
    assert [i.value for i in again.info if "this link" in i.value] == [
        "The data set in this link, `[click](https://example.org)`, is not available here; using `small` instead."]
