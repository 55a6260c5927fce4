"""cxr_core.hosting.server: the maintenance a served app starts once, not on every page render."""
from __future__ import annotations

import time

from cxr_core.hosting import job_queue, server, workspaces


def test_maintenance_starts_once_restarts_a_waiting_queue_expires_workspaces_and_ends_with_its_folder(
        tmp_path, monkeypatch):
    calls = {"dispatcher": 0, "expire": 0}
    waiting = {"now": False}
    monkeypatch.setattr(job_queue, "waiting", lambda _root: waiting["now"])
    monkeypatch.setattr(job_queue, "start_dispatcher",
                        lambda _root: calls.__setitem__("dispatcher", calls["dispatcher"] + 1))
    monkeypatch.setattr(workspaces, "expire", lambda _root: calls.__setitem__("expire", calls["expire"] + 1) or [])
    monkeypatch.setattr(server, "QUEUE_EVERY_S", 0.05)
    root = tmp_path / "runs"
    root.mkdir()
    first = server.start(root, hosted=True)
    assert server.start(root, hosted=True) is first  # once per process and folder
    assert calls == {"dispatcher": 0, "expire": 1}  # the first round ran before start returned
    waiting["now"] = True  # a job waits (left by a restart, say): the next round restarts the dispatcher
    deadline = time.time() + 5
    while calls["dispatcher"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert calls["dispatcher"] >= 1 and calls["expire"] == 1  # expiry is hourly, not every round
    root.rmdir()  # the folder went away: the thread ends by itself
    first.thread.join(5)
    assert not first.thread.is_alive()


def test_a_local_app_never_expires_workspaces(tmp_path, monkeypatch):
    expired = []
    monkeypatch.setattr(workspaces, "expire", lambda root: expired.append(root) or [])
    maintenance = server.start(tmp_path, hosted=False)
    try:
        assert not expired
    finally:
        server.stop(tmp_path)
    assert not maintenance.thread.is_alive()
