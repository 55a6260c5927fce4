"""A training process's sign of life, readable from any machine that sees the run folder.

A process on this machine is known by its pid (``runs.running_process``); a run training on another
machine, with the run folder on shared storage, cannot be checked that way. So the training process
rewrites ``heartbeat.json`` (host, pid, time) every ``EVERY_S`` seconds from a daemon thread, and a
reader on another host takes a run whose heartbeat is older than ``STALE_AFTER_S`` as stopped.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cxr_core.io.atomic import read_json, write_json_atomic

HEARTBEAT_FILE = "heartbeat.json"
EVERY_S = 30.0
#: Several missed beats (a busy shared file system can delay a write) before a remote run reads as stopped.
STALE_AFTER_S = 4 * EVERY_S


def this_host() -> str:
    return socket.gethostname()


def beat(run_dir: str | os.PathLike) -> None:
    write_json_atomic(Path(run_dir) / HEARTBEAT_FILE, {"host": this_host(), "pid": os.getpid(), "time": time.time()})


def read(run_dir: str | os.PathLike) -> dict | None:
    return read_json(Path(run_dir) / HEARTBEAT_FILE, default=None)


@contextlib.contextmanager
def beating(run_dir: str | os.PathLike, every_s: float = EVERY_S) -> Iterator[None]:
    """Beat now and every ``every_s`` seconds until the block ends (a write that fails is retried next beat)."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            with contextlib.suppress(OSError):
                beat(run_dir)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=loop, daemon=True, name="heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
