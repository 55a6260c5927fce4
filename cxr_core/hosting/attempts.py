"""Wrong operator passphrases: how many a session, a browser and a network address may type before they wait.

Each key (``session:<id>``, ``browser:<id>``, ``address:<ip>``) may make ``limit`` wrong attempts in a minute;
the attempt that reaches the limit locks the key for ``FIRST_WAIT_S``, and every later wrong attempt from it,
until it has been quiet for ``FORGET_S``, locks it again for twice as long as the time before (at most
``MAX_WAIT_S``). While any key of an attempt is locked the passphrase is not even compared: the right one is
refused too, or the lockout would not slow a guesser down. A script that drops its cookies gets a new session
and browser each time, so the address key is what holds it; an address is shared by a school's network, so it
gets a larger allowance.

The counts live in ``<runs root>/.passphrase-attempts.json`` under a file lock, so they hold across sessions
and server processes; the keys are stored hashed (no address on disk). The clock is injectable for tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from cxr_core.core.errors import CxrError
from cxr_core.io.atomic import read_json, write_json_atomic
from cxr_core.runs import registry as runs

ATTEMPTS_FILE = ".passphrase-attempts.json"
LOCK_FILE = ".passphrase-attempts.lock"
PER_MINUTE = 5            # wrong passphrases a session or a browser may type in a minute
PER_ADDRESS_MINUTE = 20   # one address may be a whole class behind a school's router
WINDOW_S = 60.0
FIRST_WAIT_S = 30.0
MAX_WAIT_S = 3600.0
FORGET_S = 3600.0         # a key quiet this long after its last attempt and lockout starts afresh
LOCK_TIMEOUT_S = 5.0
LOCAL_ADDRESS = "local"   # Streamlit gives no address for localhost (or behind a proxy on the same host)


class SignInBusyError(CxrError):
    """The file of attempts stayed locked (another process is checking a passphrase)."""


@dataclass(frozen=True)
class Outcome:
    """What became of one attempt."""

    ok: bool            # the passphrase was checked and right
    checked: bool       # False: refused unchecked during a lockout
    wait_s: float       # seconds before the next attempt is checked (0: now)
    locked: tuple[str, ...] = ()  # the kinds of key ("session", "browser", "address") this attempt locked


def keys_for(session: str, browser: str | None = None, address: str | None = None) -> dict[str, int]:
    """The keys of one attempt with their allowance per minute."""
    keys = {f"session:{session}": PER_MINUTE}
    if browser:
        keys[f"browser:{browser}"] = PER_MINUTE
    keys[f"address:{network(address)}"] = PER_ADDRESS_MINUTE
    return keys


def network(address: str | None) -> str:
    """The key of a client address: an IPv4 address as it is, an IPv6 one by its /64 (one household or host
    holds a whole /64, so a script could walk through it), none as ``LOCAL_ADDRESS``."""
    if not address:
        return LOCAL_ADDRESS
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def refusal(wait_s: float) -> str:
    """The one sentence shown during a lockout."""
    seconds = max(1, math.ceil(wait_s))
    when = f"{seconds} s" if seconds < 120 else f"{math.ceil(seconds / 60)} min"
    return f"Too many wrong passphrases; try again in {when}."


def _now() -> float:
    return time.time()  # wall time, which every process on the server shares (not monotonic)


def _forgotten(entry: dict, now: float) -> bool:
    """Quiet for ``FORGET_S`` since its last wrong attempt and the end of its lockout."""
    return now - max(float(entry.get("last", 0)), float(entry.get("until", 0))) >= FORGET_S


def _hashed(key: str) -> str:
    kind, _, value = key.partition(":")
    return f"{kind}:{hashlib.sha256(value.encode('utf-8')).hexdigest()[:24]}"


class PassphraseAttempts:
    """The wrong attempts of one runs root."""

    def __init__(self, root: str | os.PathLike | None = None, clock: Callable[[], float] | None = None) -> None:
        self.root = Path(root) if root is not None else runs.runs_root().path
        self._clock = clock or _now

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK_FILE))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise SignInBusyError("The operator sign-in is busy; try again in a moment.") from None
        try:
            data = read_json(self.root / ATTEMPTS_FILE, default={})
            state = data.get("keys") if isinstance(data, dict) else None
            yield state if isinstance(state, dict) else {}
        finally:
            lock.release()

    def _save(self, state: dict, now: float) -> None:
        kept = {key: entry for key, entry in state.items() if not _forgotten(entry, now)}
        write_json_atomic(self.root / ATTEMPTS_FILE, {"keys": kept})

    @staticmethod
    def _wait(state: dict, keys: Mapping[str, int], now: float) -> float:
        return max([0.0] + [float(state.get(_hashed(key), {}).get("until", 0)) - now for key in keys])

    def wait_s(self, keys: Mapping[str, int]) -> float:
        """Seconds before an attempt with these keys is checked (0: now)."""
        path = self.root / ATTEMPTS_FILE
        if not path.is_file():
            return 0.0
        with self._locked() as state:
            return self._wait(state, keys, self._clock())

    def attempt(self, keys: Mapping[str, int], matches: Callable[[], bool]) -> Outcome:
        """Check a passphrase (``matches``) unless one of ``keys`` is locked, and count a wrong one.

        Raises:
            SignInBusyError: the file of attempts stayed locked.
        """
        with self._locked() as state:
            now = self._clock()
            wait = self._wait(state, keys, now)
            if wait > 0:
                return Outcome(ok=False, checked=False, wait_s=wait)
            if matches():
                # A right passphrase clears its session and browser; an address may be shared, so it keeps its count.
                for key in keys:
                    if not key.startswith("address:"):
                        state.pop(_hashed(key), None)
                self._save(state, now)
                return Outcome(ok=True, checked=True, wait_s=0.0)
            locked = []
            for key, limit in keys.items():
                entry = state.get(_hashed(key)) or {}
                if _forgotten(entry, now):
                    entry = {}
                fails = [t for t in entry.get("fails", []) if now - t < WINDOW_S] + [now]
                strikes = int(entry.get("strikes", 0))
                entry = {"fails": fails, "strikes": strikes, "until": 0.0, "last": now}
                if strikes or len(fails) >= limit:
                    entry.update(fails=[], strikes=strikes + 1,
                                 until=now + min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** strikes))
                    locked.append(key.partition(":")[0])
                state[_hashed(key)] = entry
            self._save(state, now)
            return Outcome(ok=False, checked=True, wait_s=self._wait(state, keys, now), locked=tuple(locked))
