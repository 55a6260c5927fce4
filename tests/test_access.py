"""Roles and the audit trail: the operator changes the server for everyone, visitors explore.

Three modes (cxr_core.hosting.access): no secrets (a local app: the single user is the operator), an
``operator_passphrase`` typed in the sidebar, and a login (``[auth]``) with an allow-list of e-mails.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_WEIGHTS, make_dataset
from cxr_core.hosting import access, audit
from test_app import HOME, KEY_DATASET, TIMEOUT, data_root, fake_run, render, text_of

PASSPHRASE = "correct horse battery staple 7"
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "not-a-real-secret",
        "client_id": "id", "client_secret": "secret",
        "server_metadata_url": "https://accounts.example.com/.well-known/openid-configuration"}
DELETE_SENTENCE = access.SHARED_RUN_SENTENCE


def runs_dir() -> Path:
    return Path(os.environ["CXR_RUNS_DIR"])


def app(secrets: dict | None = None, user: dict | None = None) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    for key, value in (secrets or {}).items():
        at.secrets[key] = value
    if user is not None:
        at.user = user
    render(at, None, "router")
    return at


def infos(at: AppTest) -> list[str]:
    return [i.value for i in at.info]


def can_delete(at: AppTest) -> bool:
    return any(str(b.key).startswith("train_delete_confirm_") for b in at.button)


def test_the_rules():
    assert access.mode({}) == access.LOCAL and access.mode({"operator_passphrase": ""}) == access.LOCAL
    assert access.mode({"operator_passphrase": "x"}) == access.PASSPHRASE
    assert access.mode({"auth": AUTH, "operator_passphrase": "x"}) == access.LOGIN
    assert access.passphrase_matches("abc", "abc") and not access.passphrase_matches("abd", "abc")
    assert not access.passphrase_matches("", "") and not access.passphrase_matches(None, "abc")
    assert access.email_allowed(" Teacher@School.ORG ", ["teacher@school.org"])
    assert not access.email_allowed("student@school.org", ["teacher@school.org"])
    assert not access.email_allowed(None, ["teacher@school.org"])
    assert access.role_for(access.LOCAL) == access.OPERATOR
    assert access.role_for(access.PASSPHRASE) == access.VISITOR
    assert access.role_for(access.PASSPHRASE, passphrase_ok=True) == access.OPERATOR
    assert access.can(access.VISITOR, "train") and not access.can(access.VISITOR, "delete")


def test_audit_trail_is_append_only_newest_first(tmp_path):
    audit.record("start", "run-1", role="visitor", who="session-1", root=tmp_path)
    audit.record("delete", "run-1", role="operator", who="t@school.org", root=tmp_path)
    with open(tmp_path / audit.AUDIT_FILE, "a", encoding="utf-8") as handle:
        handle.write('{"torn')  # a kill mid-write loses that one line only
    entries = audit.read(tmp_path)
    assert [(e["action"], e["role"], e["who"]) for e in entries] == [
        ("delete", "operator", "t@school.org"), ("start", "visitor", "session-1")]
    with pytest.raises(ValueError):
        audit.record("format", "disk", role="visitor", who="x", root=tmp_path)


def test_local_app_without_secrets_is_the_operator_as_before():
    fake_run("run-local", None, None, state="failed", error="x")
    at = app()
    render(at, "pages/training.py", "training (local)")
    assert can_delete(at) and DELETE_SENTENCE not in infos(at)
    assert not any("Role:" in str(m.value) for m in at.sidebar.markdown)  # no role panel
    assert any("Audit trail" in e.label for e in at.expander)


@pytest.mark.slow
def test_passphrase_mode_visitor_then_operator_and_the_passphrase_is_never_written():
    run = fake_run("run-class", None, None, state="failed", error="x")
    at = app({"operator_passphrase": PASSPHRASE})
    render(at, "pages/training.py", "training (visitor)")
    assert not can_delete(at) and DELETE_SENTENCE in infos(at)
    assert not any("Audit trail" in e.label for e in at.expander)
    assert any("Role:** visitor" in str(m.value) for m in at.sidebar.markdown)
    # The Dataset page: no download, upload or practice set for a visitor, one sentence for each.
    render(at, "pages/dataset.py", "dataset (visitor)")
    keys = {b.key for b in at.button}
    assert not {"download_kermany", "make_practice"} & keys and not at.file_uploader
    assert {access.OPERATOR_ONLY[a] for a in ("download", "unpack", "practice")} <= set(infos(at))
    # A wrong passphrase stays a visitor.
    at.text_input(key="access_passphrase").input("wrong guess")
    render(at, None, "dataset (wrong passphrase)")
    assert "make_practice" not in {b.key for b in at.button}
    assert "That passphrase is not the operator's." in text_of(at)
    # The right one makes this session the operator; the field is emptied.
    at.text_input(key="access_passphrase").input(PASSPHRASE)
    render(at, None, "dataset (operator)")
    assert {"download_kermany", "make_practice"} <= {b.key for b in at.button} and at.file_uploader
    assert at.session_state["access_passphrase"] == ""
    render(at, "pages/training.py", "training (operator)")
    assert can_delete(at)
    at.button(key="train_delete_confirm_run-class").click()
    render(at, None, "training (deleted)")
    assert not run.exists()
    entry = audit.read(runs_dir())[0]
    assert (entry["action"], entry["target"], entry["role"]) == ("delete", "run-class", "operator")
    assert entry["who"] == at.session_state["access_browser_id"]  # the browser's id, the same in its every session
    assert any("Audit trail" in e.label for e in at.expander)
    # Another session is a visitor again.
    other = app({"operator_passphrase": PASSPHRASE})
    render(other, "pages/training.py", "training (another visitor)")
    assert not can_delete(other)
    # The passphrase is in no file the app wrote.
    needle = PASSPHRASE.encode()
    for root in (runs_dir(), data_root(), Path(os.environ.get("CXR_TEST_ARTIFACTS", runs_dir()))):
        for path in (p for p in root.rglob("*") if p.is_file()) if root.is_dir() else ():
            assert needle not in path.read_bytes(), path


@pytest.mark.parametrize(("email", "operator"), [("Teacher@School.org", True), ("student@school.org", False)])
def test_login_mode_allow_list(email, operator):
    fake_run("run-login", None, None, state="failed", error="x")
    secrets = {"auth": AUTH, "operators": ["teacher@school.org"]}
    at = app(secrets, user={"is_logged_in": True, "email": email})
    render(at, "pages/training.py", "training (signed in)")
    assert can_delete(at) is operator and (DELETE_SENTENCE in infos(at)) is not operator
    assert any(b.key == "access_logout" for b in at.sidebar.button)
    # Signed out: a visitor, offered the login button.
    at = app(secrets, user={"is_logged_in": False})
    render(at, "pages/training.py", "training (signed out)")
    assert not can_delete(at) and any(b.key == "access_login_default" for b in at.sidebar.button)


@pytest.mark.slow
def test_a_visitor_trains_into_their_workspace_through_the_queue(monkeypatch):
    """A visitor's run goes to their own workspace; while the server's places are taken it waits with its
    place shown, a second one is refused in one sentence, and withdrawing it removes it unstarted."""
    from cxr_core.hosting import job_queue, jobs, workspaces
    from cxr_core.runs.run_folder import RunFolder

    make_dataset(data_root() / "small", n_normal=20, n_pneumonia=40, size=48, layout="kermany")
    started = []

    def start_training(config, root=None, run_dir=None):  # noqa: ARG001 (the real signature)
        started.append(Path(run_dir))
        RunFolder(run_dir).write_status("failed", error="not really trained in this test")
        return Path(run_dir)

    monkeypatch.setattr(jobs, "start_training", start_training)
    monkeypatch.setattr(job_queue, "start_dispatcher", lambda *_args, **_kwargs: None)
    weights_dir = Path(os.environ["CXR_WEIGHTS_DIR"])
    weights_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_WEIGHTS, weights_dir / "mobilenet_v2_0.35_tiny.weights.h5")
    at = app({"operator_passphrase": PASSPHRASE})
    at.session_state[KEY_DATASET] = "small"
    render(at, "pages/training.py", "training (visitor, data set)")
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (visitor, backbone)")
    next(b for b in at.button if b.label == "Start training").click()
    render(at, None, "training (visitor started)")
    ws = at.session_state["access_browser_id"]
    assert len(started) == 1 and started[0].parent == workspaces.workspaces_dir() / ws
    entry = audit.read(runs_dir())[0]
    assert (entry["action"], entry["target"], entry["role"], entry["who"]) == ("start", started[0].name, "visitor", ws)

    # The server's places are taken: the next run waits in the queue, its place shown.
    monkeypatch.setattr(job_queue, "dispatch", lambda *_args, **_kwargs: [])
    next(b for b in at.button if b.label == "Start training").click()
    render(at, None, "training (visitor queued)")
    waiting = job_queue.waiting()
    assert len(waiting) == 1 and waiting[0].run_dir.parent == workspaces.workspaces_dir() / ws
    assert "Waiting in the queue: place 1 of 1." in " ".join(infos(at))
    assert next(b for b in at.button if b.label == "Add to the queue")  # the button says what will happen
    next(b for b in at.button if b.label == "Add to the queue").click()
    render(at, None, "training (a second one refused)")
    assert ("You already have a training job waiting in the queue (the limit is 1 per visitor); withdraw it or wait "
            "for it to start.") in [w.value for w in at.warning]
    assert len(job_queue.waiting()) == 1
    at.button(key=f"withdraw_confirm_{waiting[0].run_dir.name}").click()
    render(at, None, "training (withdrawn)")
    assert job_queue.waiting() == [] and not waiting[0].run_dir.exists() and len(started) == 1
    assert audit.read(runs_dir())[0]["action"] == "withdraw"


def test_the_training_job_does_not_inherit_the_passphrase(tmp_path, monkeypatch):
    """Streamlit copies top-level secrets into os.environ; the training process gets none of it."""
    from cxr_core.hosting import jobs
    from cxr_core.runs.run_folder import RunFolder

    seen = {}
    monkeypatch.setenv(access.PASSPHRASE_SECRET, PASSPHRASE)
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda *_args, **kwargs: seen.update(kwargs["env"]))
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    jobs._launch(folder, tmp_path / "lock")
    assert seen and access.PASSPHRASE_SECRET not in seen and PASSPHRASE not in seen.values()


def test_a_visitor_cannot_add_a_weights_file_to_the_server(small_kermany_for_access):
    at = app({"operator_passphrase": PASSPHRASE})
    at.session_state[KEY_DATASET] = small_kermany_for_access
    render(at, "pages/training.py", "training (visitor)")
    # A visitor is not offered the upload at all (and so never reads a refusal of it).
    offered = at.selectbox(key="train_weights").options
    assert offered and not any("upload" in str(option).lower() for option in offered) and not at.file_uploader
    assert access.OPERATOR_ONLY["weights"] not in infos(at)
    at.text_input(key="access_passphrase").input(PASSPHRASE)
    render(at, None, "training (operator)")
    at.selectbox(key="train_weights").set_value("upload")
    render(at, None, "training (operator uploads weights)")
    assert at.file_uploader and access.OPERATOR_ONLY["weights"] not in infos(at)


@pytest.fixture
def small_kermany_for_access() -> str:
    make_dataset(data_root() / "small", n_normal=10, n_pneumonia=14, size=32)
    return "small"
