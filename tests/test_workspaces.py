"""A workspace per visitor and limits sized to the host (a class on one hosted app).

Visitors' runs live in ``<runs root>/workspaces/<id>/``; the operator's runs are shared. A visitor sees
the shared runs and their own, deletes only their own, and does not see another visitor's.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cxr_core.core.errors import BadSettingError
from cxr_core.hosting import access, resources, workspaces
from cxr_core.runs import registry as runs
from test_access import AUTH, PASSPHRASE, app, can_delete, infos
from test_app import HOME, TIMEOUT, fake_run, render, text_of


def runs_dir() -> Path:
    return Path(os.environ["CXR_RUNS_DIR"])


def move_into(run: Path, workspace: str) -> Path:
    """Put a run folder made by ``fake_run`` into a visitor's workspace."""
    target = workspaces.folder(workspace) / run.name
    os.replace(run, target)
    return target


# --- The rules, without Streamlit ---------------------------------------------------------------------
def test_workspace_ids_hide_the_address_and_reject_anything_else():
    one = workspaces.id_for_email("Student@School.org ")
    assert one == workspaces.id_for_email("student@school.org") and "school" not in one
    assert workspaces.valid_id(one) and workspaces.valid_id(workspaces.new_browser_id())
    assert workspaces.new_browser_id() != workspaces.new_browser_id()
    for bad in (None, "", "../../etc", "b-xyz", "b-" + "0" * 8, "u-" + "a" * 24 + "/x"):
        assert not workspaces.valid_id(bad)
    with pytest.raises(ValueError):
        workspaces.folder("../escape")


def test_a_visitor_lists_the_shared_runs_and_their_own_the_operator_all():
    shared = fake_run("run-shared", None, None, state="failed", error="x")
    mine = move_into(fake_run("run-mine", None, None, state="failed", error="x"), "b-" + "1" * 24)
    theirs = move_into(fake_run("run-theirs", None, None, state="failed", error="x"), "b-" + "2" * 24)
    listed = lambda **kw: {s.path.name: s.owner for s in runs.list_runs(include_demo=False, **kw)}  # noqa: E731
    assert listed() == {"run-shared": ""}  # a local app: the workspaces folder is not a run
    assert listed(workspace="b-" + "1" * 24) == {"run-shared": "", "run-mine": "b-" + "1" * 24}
    assert listed(everyone=True) == {"run-shared": "", "run-mine": "b-" + "1" * 24, "run-theirs": "b-" + "2" * 24}
    assert workspaces.owner_of(mine) == "b-" + "1" * 24 and workspaces.owner_of(shared) is None
    assert workspaces.owner_of(theirs) == "b-" + "2" * 24
    # Who may delete what.
    assert access.can_delete_run(access.OPERATOR, "", None)
    assert access.can_delete_run(access.VISITOR, "b-" + "1" * 24, "b-" + "1" * 24)
    assert not access.can_delete_run(access.VISITOR, "", "b-" + "1" * 24)
    assert not access.can_delete_run(access.VISITOR, "b-" + "2" * 24, "b-" + "1" * 24)


def test_the_workspace_limit_comes_from_the_disk_or_the_operator_and_a_full_one_is_refused():
    assert workspaces.limit_mb(env={}, free_bytes=10 * 2**40) == workspaces.MAX_MB  # a big disk: the cap
    assert workspaces.limit_mb(env={}, free_bytes=2**30) == workspaces.MIN_MB      # a small one: the floor
    assert workspaces.limit_mb(env={}, free_bytes=20 * 2**30) == 20 * 1024 // 50
    assert workspaces.limit_mb(env={"CXR_WORKSPACE_MB": "300"}) == 300
    with pytest.raises(BadSettingError, match="CXR_WORKSPACE_MB must be a whole number"):
        workspaces.limit_mb(env={"CXR_WORKSPACE_MB": "lots"})
    ws = "b-" + "3" * 24
    workspaces.check_room(ws, limit=1)  # empty: room
    (workspaces.folder(ws) / "run-big").mkdir()
    (workspaces.folder(ws) / "run-big" / "model.keras").write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(workspaces.WorkspaceFullError) as caught:
        workspaces.check_room(ws, limit=1)
    assert str(caught.value) == ("Your workspace holds 2 MB of runs and its limit is 1 MB; delete one of your runs "
                                 "before starting another.")


def test_unused_workspaces_expire_unless_something_trains_or_waits_there():
    old, recent, busy = ("b-" + c * 24 for c in "456")
    for ws in (old, recent, busy):
        workspaces.folder(ws)
    move_into(fake_run("run-busy", None, None, state="running", pid=os.getpid()), busy)
    ten_days_ago = str(time.time() - 10 * 86400).encode()
    for ws in (old, busy):
        (workspaces.workspaces_dir() / ws / workspaces.LAST_USED_FILE).write_bytes(ten_days_ago)
    assert workspaces.expire(days=7) == [old]
    assert not (workspaces.workspaces_dir() / old).exists()
    assert (workspaces.workspaces_dir() / recent).is_dir()
    assert (workspaces.workspaces_dir() / busy / "run-busy").is_dir()  # a training run keeps its workspace
    assert workspaces.max_age_days(env={"CXR_WORKSPACE_DAYS": "2.5"}) == 2.5
    with pytest.raises(BadSettingError, match="CXR_WORKSPACE_DAYS must be a number of days above 0"):
        workspaces.max_age_days(env={"CXR_WORKSPACE_DAYS": "0"})


def test_uploads_per_minute_and_jobs_at_once_follow_the_host():
    assert resources.uploads_per_minute(env={}, cores=2) == 2 * resources.UPLOADS_PER_CORE_MINUTE
    assert resources.uploads_per_minute(env={"CXR_UPLOADS_PER_MINUTE": "5"}) == 5
    with pytest.raises(BadSettingError):
        resources.uploads_per_minute(env={"CXR_UPLOADS_PER_MINUTE": "-1"})
    limiter = resources.RateLimiter(2)
    assert limiter.allow("a", now=0.0) and limiter.allow("a", now=1.0) and not limiter.allow("a", now=2.0)
    assert limiter.allow("b", now=2.0)  # per visitor
    assert limiter.allow("a", now=61.0)  # the first one left the minute
    assert "2 images in the last minute" in limiter.refusal()
    assert resources.max_training_jobs(memory_bytes=690 * 2**20, cores=2) == 1  # Community Cloud: one
    assert resources.max_training_jobs(memory_bytes=16 * 2**30, cores=4) == 4
    assert resources.max_training_jobs(memory_bytes=4 * 2**30, cores=8) == 2


# --- The pages ---------------------------------------------------------------------------------------
def _visitor(browser_id: str | None = None) -> AppTest:
    at = app({"operator_passphrase": PASSPHRASE})
    if browser_id:
        at.session_state["access_browser_id"] = browser_id
    return at


def test_visitors_see_their_own_runs_and_the_shared_ones_and_delete_only_their_own():
    fake_run("run-shared", None, None, state="failed", error="x")
    mine_id, theirs_id = "b-" + "a" * 24, "b-" + "b" * 24
    mine = move_into(fake_run("run-mine", None, None, state="failed", error="x"), mine_id)
    move_into(fake_run("run-theirs", None, None, state="failed", error="x"), theirs_id)
    at = _visitor(mine_id)
    render(at, "pages/training.py", "training (visitor with a workspace)")
    table = next(d.value for d in at.dataframe if "owner" in d.value.columns)
    owners = dict(zip(table["run"], table["owner"]))
    assert owners == {"run-shared": "shared", "run-mine": "yours"}  # not the other visitor's run
    assert access.SHARED_RUN_SENTENCE in infos(at)
    assert at.selectbox(key="train_delete_choice").options == ["run-mine (failed)"]
    at.button(key="train_delete_confirm_run-mine").click()
    render(at, None, "training (visitor deleted their run)")
    assert not mine.exists() and (runs_dir() / "run-shared").is_dir()
    # The operator sees every workspace and may delete anything.
    at.text_input(key="access_passphrase").input(PASSPHRASE)
    render(at, None, "training (operator)")
    table = next(d.value for d in at.dataframe if "owner" in d.value.columns)
    assert set(table["run"]) == {"run-shared", "run-theirs"} and can_delete(at)
    assert "workspace b-bbbbbbbb" in set(table["owner"])


def test_a_signed_in_visitor_has_the_workspace_of_their_address_on_every_visit():
    ws = workspaces.id_for_email("student@school.org")
    move_into(fake_run("run-signed-in", None, None, state="failed", error="x"), ws)
    for _ in range(2):  # two visits, two sessions: the same workspace
        at = app({"auth": AUTH, "operators": ["teacher@school.org"]},
                 user={"is_logged_in": True, "email": "Student@School.org"})
        render(at, "pages/training.py", "training (signed-in visitor)")
        assert at.selectbox(key="train_delete_choice").options == ["run-signed-in (failed)"]


def test_a_local_app_has_no_workspaces_and_no_owner_column():
    fake_run("run-local", None, None, state="failed", error="x")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/training.py", "training (local)")
    assert all("owner" not in d.value.columns for d in at.dataframe)
    assert not workspaces.workspaces_dir().exists()
    assert access.SHARED_RUN_SENTENCE not in text_of(at)


def test_predict_takes_at_most_the_uploads_per_minute_and_says_so(monkeypatch):
    import cv2
    import numpy as np

    from cxr_core.runs.run_folder import RunFolder

    monkeypatch.delenv("CXR_DEMO_RUN")
    if not RunFolder(runs.DEMO_RUN_DIR).has_model():
        pytest.skip("no demo run in artifacts/")
    monkeypatch.setenv("CXR_UPLOADS_PER_MINUTE", "1")
    rng = np.random.default_rng(0)
    images = [(f"xray{i}.png", cv2.imencode(".png", rng.integers(0, 255, (64, 64), dtype=np.uint8))[1].tobytes(),
               "image/png") for i in range(2)]
    at = _visitor("b-" + "c" * 24)
    render(at, "pages/predict.py", "predict (visitor)")
    at.file_uploader(key="predict_upload").set_value(images)
    render(at, None, "predict (two uploads, limit 1)")
    assert ("You have uploaded 1 image in the last minute, the limit on this server; wait a minute and upload the "
            "rest again.") in [w.value for w in at.warning]
    assert list(at.dataframe[0].value["file"]) == ["xray0.png"]  # the first was classified, the second waits


def test_only_the_operator_sets_how_many_jobs_train_at_once_and_it_is_audited(monkeypatch):
    from cxr_core.hosting import audit, job_queue

    monkeypatch.delenv("CXR_MAX_JOBS", raising=False)
    monkeypatch.setattr(resources, "max_training_jobs", lambda *_args, **_kwargs: 3)
    at = _visitor("b-" + "d" * 24)
    render(at, "pages/training.py", "training (visitor)")
    assert not [n for n in at.number_input if n.key == "queue_max_jobs"]
    at.text_input(key="access_passphrase").input(PASSPHRASE)
    render(at, None, "training (operator)")
    at.number_input(key="queue_max_jobs").set_value(2)
    render(at, None, "training (two at once)")
    assert job_queue.max_concurrent() == 2
    entry = audit.read(runs_dir())[0]
    assert (entry["action"], entry["target"], entry["role"]) == ("jobs at once", "2", "operator")


def _kept_cookie(at: AppTest) -> str | None:
    """The workspace cookie this run asks the browser to keep (None when it asks nothing)."""
    scripts = " ".join(str(getattr(h, "proto", h)) for h in at.get("html"))
    found = re.search(r"cxr_workspace=([^;]*);", scripts)
    return found.group(1) if found else None


def _sending(monkeypatch, cookie: str | None) -> None:
    """What the browser sends with a new session (AppTest cannot seed st.context.cookies)."""
    import pages.ui.access as ui

    monkeypatch.setattr(ui, "_request_cookies", lambda: {} if cookie is None else {"cxr_workspace": cookie})


@pytest.mark.slow
def test_a_visitor_gets_a_signed_id_and_a_forged_one_gets_a_fresh_workspace(monkeypatch):
    from cxr_core.hosting import cookies

    _sending(monkeypatch, None)
    at = _visitor()
    render(at, "pages/training.py", "training (first visit)")
    ws = at.session_state["access_browser_id"]
    assert workspaces.valid_id(ws) and ws.startswith("b-")
    signed = _kept_cookie(at)
    secret = cookies.server_secret(runs_dir())
    assert signed == cookies.sign_browser_id(ws, secret) and signed != ws  # the browser keeps it signed
    scripts = " ".join(str(getattr(h, "proto", h)) for h in at.get("html"))
    assert "SameSite=Strict" in scripts and "Secure" in scripts  # Secure whenever the page came over https

    # The next visit sends it back: the same workspace, and nothing more to keep.
    _sending(monkeypatch, signed)
    again = _visitor()
    render(again, "pages/training.py", "training (return visit)")
    assert again.session_state["access_browser_id"] == ws and _kept_cookie(again) is None

    # Another visitor's id, a made-up one, or a signature from elsewhere: a fresh workspace, not theirs.
    theirs = "b-" + "e" * 24
    move_into(fake_run("run-theirs", None, None, state="failed", error="x"), theirs)
    listed = lambda at: any("run-theirs" in set(d.value.get("run", [])) for d in at.dataframe)  # noqa: E731
    _sending(monkeypatch, cookies.sign_browser_id(theirs, secret))
    render(owner := _visitor(), "pages/training.py", "training (their own signed cookie)")
    assert owner.session_state["access_browser_id"] == theirs and listed(owner)  # what the check below would see
    for cookie in (theirs, "b-0000000000000000", f"{theirs}.{signed.rpartition('.')[2]}"):
        _sending(monkeypatch, cookie)
        visitor = _visitor()
        render(visitor, "pages/training.py", f"training (forged cookie {cookie[:20]})")
        got = visitor.session_state["access_browser_id"]
        assert got not in (theirs, "b-0000000000000000", ws) and workspaces.valid_id(got)
        assert _kept_cookie(visitor) == cookies.sign_browser_id(got, secret)  # the browser is given the new one
        assert not listed(visitor)
