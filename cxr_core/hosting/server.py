"""What a served app runs beside its pages, started once per server process and runs folder.

``start(root, hosted=...)`` starts one daemon thread that keeps the shared server tidy: a queue
left waiting (after a restart, say) gets its dispatcher back (``job_queue.start_dispatcher``), and
on a hosted app the visitors' workspaces unused for too long go (``workspaces.expire``, hourly), and
where resident training workers are on (``workers.enabled``: ``$CXR_RESIDENT_WORKERS=1``)
each round keeps one per training slot alive (``workers.Pool.keep``). The pages call ``start`` through
a once-per-process cache instead of doing this work on every render.
The thread ends by itself when its runs folder goes away (a test's temporary folder, say).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cxr_core.core.errors import CxrError
from cxr_core.hosting import job_queue, workers, workspaces

log = logging.getLogger(__name__)

#: Seconds between two looks at the queue, and between two expiries of workspaces.
QUEUE_EVERY_S = 5.0
EXPIRE_EVERY_S = 3600.0


@dataclass
class Maintenance:
    """The maintenance thread of one runs folder."""

    root: Path
    hosted: bool
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    expired: list[str] = field(default_factory=list)
    last_expiry: float = 0.0
    #: The resident training workers, where they are on.
    pool: workers.Pool | None = None

    def round(self) -> None:
        """One look: keep the resident workers; restart the dispatcher of a waiting queue; expire
        workspaces when due."""
        if self.pool is not None:
            self.pool.keep()
        if job_queue.waiting(self.root):
            job_queue.start_dispatcher(self.root)
        if self.hosted and time.time() - self.last_expiry >= EXPIRE_EVERY_S:
            self.last_expiry = time.time()
            self.expired += workspaces.expire(self.root)

    def run(self) -> None:
        while not self.stop.is_set() and self.root.is_dir():
            try:
                self.round()
            except (OSError, CxrError) as error:  # a failure here never stops the server
                log.warning("Maintenance of %s failed: %s", self.root, error)
            self.stop.wait(QUEUE_EVERY_S)


_STARTED: dict[str, Maintenance] = {}
_LOCK = threading.Lock()


def start(root: str | os.PathLike, *, hosted: bool) -> Maintenance:
    """Start the maintenance of ``root`` once per process (later calls return the same one); its
    first round runs before this returns, so a waiting queue moves at once."""
    path = Path(root).resolve()
    with _LOCK:
        current = _STARTED.get(str(path))
        if current is not None and current.thread is not None and current.thread.is_alive():
            return current
        maintenance = Maintenance(path, hosted, pool=workers.Pool(path) if workers.enabled() else None)
        try:
            maintenance.round()
        except (OSError, CxrError) as error:
            log.warning("Maintenance of %s failed: %s", path, error)
        maintenance.thread = threading.Thread(target=maintenance.run, daemon=True, name=f"maintenance {path}")
        _STARTED[str(path)] = maintenance
        maintenance.thread.start()
        return maintenance


def stop(root: str | os.PathLike, timeout: float = 10.0) -> None:
    """Stop the maintenance of ``root`` (tests; a server just ends)."""
    with _LOCK:
        current = _STARTED.pop(str(Path(root).resolve()), None)
    if current is not None and current.thread is not None:
        current.stop.set()
        current.thread.join(timeout)
    if current is not None and current.pool is not None:
        current.pool.close(timeout)
