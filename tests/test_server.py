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


def test_resident_workers_are_kept_only_where_the_operator_turns_them_on(tmp_path, monkeypatch):
    from cxr_core.hosting import workers

    kept, closed = [], []
    monkeypatch.setattr(workers.Pool, "keep", lambda pool: kept.append(pool.root) or [])
    monkeypatch.setattr(workers.Pool, "close", lambda pool, _timeout=10.0: closed.append(pool.root))
    monkeypatch.delenv(workers.ENV, raising=False)
    plain = server.start(tmp_path / "a", hosted=True)
    assert plain.pool is None and not kept  # not even on a hosted app, unless asked for
    server.stop(tmp_path / "a")
    monkeypatch.setenv(workers.ENV, "1")
    (tmp_path / "b").mkdir()
    chosen = server.start(tmp_path / "b", hosted=False)
    assert isinstance(chosen.pool, workers.Pool) and set(kept) == {(tmp_path / "b").resolve()}  # every round
    server.stop(tmp_path / "b")
    assert closed == [(tmp_path / "b").resolve()]
