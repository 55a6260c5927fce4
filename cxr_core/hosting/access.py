"""Who may change the server for everyone: the rules of the two roles, without Streamlit.

A deployment is in one of three modes, read from its secrets: ``login`` (an identity provider in
``[auth]``; the operators are an allow-list of e-mail addresses), ``passphrase`` (an
``operator_passphrase``), or ``local`` (no secrets: the single user is the operator).
"""
from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any

OPERATOR, VISITOR = "operator", "visitor"
LOCAL, PASSPHRASE, LOGIN = "local", "passphrase", "login"
PASSPHRASE_SECRET = "operator_passphrase"  # the key in secrets.toml

# What changes the server for everyone, and the one sentence a visitor sees instead of the control.
OPERATOR_ONLY = {
    "delete": "Only the operator of this app can delete runs; ask your teacher.",
    "download": "Only the operator of this app can download data sets to the server; ask your teacher.",
    "unpack": "Only the operator of this app can upload and unpack data sets; ask your teacher.",
    "practice": "Only the operator of this app can make the practice set; ask your teacher.",
    "shortcut lab": "Only the operator of this app can make shortcut-lab copies of data sets; ask your teacher.",
    "data_root": "Only the operator of this app can change the data folder; ask your teacher.",
    "weights": "Only the operator of this app can add weights files to the server; ask your teacher.",
}


def mode(secrets: Mapping[str, Any]) -> str:
    """``login`` when an identity provider is configured, ``passphrase`` when a passphrase is, else ``local``."""
    if secrets.get("auth"):
        return LOGIN
    if str(secrets.get(PASSPHRASE_SECRET) or ""):
        return PASSPHRASE
    return LOCAL


def passphrase_matches(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison (no timing hint of how much matched); an empty passphrase never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(str(given).encode("utf-8"), str(expected).encode("utf-8"))


def _addresses(allowed: Iterable[str] | str | None) -> set[str]:
    if not allowed:
        return set()
    if isinstance(allowed, str):
        allowed = allowed.split(",")
    return {str(a).strip().casefold() for a in allowed if str(a).strip()}


def email_allowed(email: str | None, allowed: Iterable[str] | str | None) -> bool:
    """Whether ``email`` is on the allow-list; addresses compare without case and surrounding spaces."""
    return bool(email) and str(email).strip().casefold() in _addresses(allowed)


def role_for(how: str, *, email: str | None = None, operators: Iterable[str] | str | None = None,
             passphrase_ok: bool = False) -> str:
    """The role of one session in deployment mode ``how``."""
    if how == LOCAL:
        return OPERATOR
    if how == LOGIN:
        return OPERATOR if email_allowed(email, operators) else VISITOR
    if how == PASSPHRASE:
        return OPERATOR if passphrase_ok else VISITOR
    raise ValueError(f"unknown access mode {how!r}")


def can(role: str, action: str) -> bool:
    """Whether ``role`` may do ``action``; anything not in ``OPERATOR_ONLY`` is open to everyone."""
    return role == OPERATOR or action not in OPERATOR_ONLY


#: What a visitor sees beside the runs they may not delete.
SHARED_RUN_SENTENCE = ("You can delete only the runs in your own workspace; the shared runs belong to the operator "
                       "of this app.")


def can_delete_run(role: str, run_owner: str, workspace: str | None) -> bool:
    """The operator deletes any run; a visitor only a run of their own workspace (``run_owner`` is the
    workspace a run belongs to, "" for a shared run)."""
    if role == OPERATOR:
        return True
    return bool(run_owner) and run_owner == workspace
