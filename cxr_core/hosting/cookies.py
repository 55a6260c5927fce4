"""What a browser keeps for a hosted app, signed so that it cannot be made up: its id and the operator role.

``cxr_workspace=<browser id>.<mac>`` names a visitor's browser (and so their workspace); an id without its
MAC, with a wrong one, or not in the shape ``workspaces.new_browser_id`` makes, is worth nothing, so a
visitor cannot choose a workspace by writing a cookie. ``cxr_operator=<expiry>.<browser id>.<mac>`` keeps
the operator role for that browser until the expiry (12 h); the MAC covers a hash of the passphrase, so
changing the passphrase ends every operator cookie, and the browser id, so the cookie is worth nothing
beside another browser's id.

The MACs are HMAC-SHA256 under the server's secret: ``cookie_secret`` in the app's secrets when it is long
enough, else 32 random bytes made once in ``<runs root>/.cookie-secret`` (readable by its owner only where
the system has such permissions). The page scripts can still read the cookies (Streamlit lets an app set a
cookie only from the page), but what they read cannot be changed into another valid one.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from filelock import FileLock

from cxr_core.hosting import workspaces
from cxr_core.io.atomic import atomic_path
from cxr_core.runs import registry as runs

log = logging.getLogger(__name__)

SECRET_FILE = ".cookie-secret"
SECRET_LOCK = ".cookie-secret.lock"
SECRET_BYTES = 32
MIN_CONFIGURED = 32  # characters of a configured cookie_secret; a shorter one could be guessed
OPERATOR_TTL_S = 12 * 3600


def server_secret(root: str | os.PathLike | None = None, configured: str | None = None) -> bytes:
    """The key of every MAC: ``configured`` (the app's ``cookie_secret``) when long enough, else the one in the
    runs root, made on first use (under a file lock, so two processes never make two)."""
    if configured:
        if len(str(configured)) >= MIN_CONFIGURED:
            return str(configured).encode("utf-8")
        log.warning("cookie_secret is shorter than %d characters; the secret in the runs root is used.",
                    MIN_CONFIGURED)
    folder = Path(root) if root is not None else runs.runs_root().path
    path = folder / SECRET_FILE
    secret = _read_secret(path)
    if secret:
        return secret
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / SECRET_LOCK)):
        secret = _read_secret(path)
        if not secret:
            secret = secrets.token_bytes(SECRET_BYTES)
            with atomic_path(path) as tmp:
                tmp.write_bytes(secret)
                os.chmod(tmp, 0o600)  # only the server's user; on Windows this sets nothing beyond read/write
    return secret


def _read_secret(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if len(data) == SECRET_BYTES else None


def _mac(secret: bytes, *parts: str) -> str:
    digest = hmac.new(secret, "|".join(parts).encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _same(given: str, wanted: str) -> bool:
    # Constant time; bytes, because compare_digest refuses a str with characters beyond ASCII (a cookie may hold any).
    return hmac.compare_digest(given.encode("utf-8"), wanted.encode("utf-8"))


def _browser_id_ok(value: str) -> bool:
    return value.startswith("b-") and workspaces.valid_id(value)


def sign_browser_id(browser_id: str, secret: bytes) -> str:
    """The cookie value that keeps ``browser_id``."""
    if not _browser_id_ok(browser_id):
        raise ValueError(f"not a browser id: {browser_id!r}")
    return f"{browser_id}.{_mac(secret, 'browser', browser_id)}"


def browser_id_from(value: str | None, secret: bytes) -> str | None:
    """The browser id a cookie value carries, or None when it is missing, unsigned or forged."""
    browser_id, _, mac = str(value or "").rpartition(".")
    if not _browser_id_ok(browser_id) or not mac:
        return None
    return browser_id if _same(mac, _mac(secret, "browser", browser_id)) else None


def _passphrase_hash(passphrase: str) -> str:
    return hashlib.sha256(passphrase.encode("utf-8")).hexdigest()


def operator_token(browser_id: str, secret: bytes, passphrase: str, now: float,
                   ttl_s: float = OPERATOR_TTL_S) -> str:
    """The cookie value that keeps the operator role for ``browser_id`` until ``now + ttl_s``."""
    if not _browser_id_ok(browser_id) or not passphrase:
        raise ValueError("an operator token needs a browser id and a passphrase")
    expiry = str(int(now + ttl_s))
    return f"{expiry}.{browser_id}.{_mac(secret, 'operator', expiry, browser_id, _passphrase_hash(passphrase))}"


def operator_expiry(token: str | None, secret: bytes, passphrase: str | None, browser_id: str | None,
                    now: float) -> float | None:
    """When the operator role ``token`` keeps ends, or None when it is not valid now: expired, forged, made
    under another passphrase, or for another browser."""
    expiry, _, rest = str(token or "").partition(".")
    token_browser, _, mac = rest.rpartition(".")
    if not (expiry.isascii() and expiry.isdigit() and len(expiry) <= 12 and mac):
        return None
    if not passphrase or not browser_id or token_browser != browser_id or int(expiry) <= now:
        return None
    wanted = _mac(secret, "operator", expiry, token_browser, _passphrase_hash(passphrase))
    return float(expiry) if _same(mac, wanted) else None
