"""Signing in as the operator of a hosted app, as a class would meet it.

Wrong passphrases are limited per session, browser and address (``cxr_core.hosting.attempts``), on disk so
that new sessions and other processes share the count; what the browser keeps (its id, the operator role for
12 h) is signed (``cxr_core.hosting.cookies``), so a cookie written by hand is worth nothing; the operator
stays the operator after a reload and has one identity in the audit trail.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from cxr_core.hosting import attempts, audit, cookies, workspaces
from test_access import PASSPHRASE, app
from test_app import render, text_of

SECRET = b"k" * 32
OTHER_SECRET = b"q" * 32
BROWSER, OTHER_BROWSER = "b-" + "1" * 24, "b-" + "2" * 24


def runs_dir() -> Path:
    return Path(os.environ["CXR_RUNS_DIR"])


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tracked(answer: bool):
    calls = []

    def matches() -> bool:
        calls.append(1)
        return answer
    return matches, calls


# --- The limit on wrong passphrases, without Streamlit ----------------------------------------------------
def test_five_wrong_in_a_minute_lock_the_session_and_even_the_right_passphrase_waits(tmp_path):
    clock = Clock()
    limit = attempts.PassphraseAttempts(tmp_path, clock=clock)
    keys = attempts.keys_for("s1", BROWSER, "203.0.113.7")
    for _ in range(attempts.PER_MINUTE - 1):
        outcome = limit.attempt(keys, lambda: False)
        assert outcome.checked and not outcome.ok and outcome.wait_s == 0
        clock.now += 2
    outcome = limit.attempt(keys, lambda: False)
    assert outcome.wait_s == attempts.FIRST_WAIT_S and set(outcome.locked) == {"session", "browser"}
    clock.now += 10
    right, calls = _tracked(True)
    outcome = limit.attempt(keys, right)
    assert not outcome.ok and not outcome.checked and calls == []  # not even compared during the lockout
    assert outcome.wait_s == attempts.FIRST_WAIT_S - 10 and limit.wait_s(keys) == attempts.FIRST_WAIT_S - 10
    assert attempts.refusal(outcome.wait_s) == "Too many wrong passphrases; try again in 20 s."
    clock.now += 21
    assert limit.attempt(keys, right).ok and calls == [1]
    # The right one cleared the session and the browser: five more before the next lockout.
    assert not limit.attempt(keys, lambda: False).locked


def test_each_wrong_attempt_after_a_lockout_doubles_the_wait_until_an_hour_of_quiet(tmp_path):
    clock = Clock()
    limit = attempts.PassphraseAttempts(tmp_path, clock=clock)
    keys = attempts.keys_for("s1", BROWSER)
    for _ in range(attempts.PER_MINUTE):
        outcome = limit.attempt(keys, lambda: False)
    waits = [outcome.wait_s]
    for _ in range(8):
        clock.now += outcome.wait_s
        outcome = limit.attempt(keys, lambda: False)
        waits.append(outcome.wait_s)
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]  # capped at MAX_WAIT_S
    clock.now += outcome.wait_s + attempts.FORGET_S
    assert limit.attempt(keys, lambda: False).wait_s == 0  # forgotten after an hour of quiet


def test_a_script_that_drops_its_cookies_is_held_by_its_address(tmp_path):
    clock = Clock()
    limit = attempts.PassphraseAttempts(tmp_path, clock=clock)
    for n in range(attempts.PER_ADDRESS_MINUTE):  # a new session and a new browser every time
        outcome = limit.attempt(attempts.keys_for(f"s{n}", f"b-{n:024x}", "203.0.113.7"), lambda: False)
        clock.now += 1
    assert outcome.locked == ("address",) and outcome.wait_s == attempts.FIRST_WAIT_S
    right, calls = _tracked(True)
    fresh = attempts.keys_for("s-new", "b-" + "f" * 24, "203.0.113.7")
    assert not limit.attempt(fresh, right).checked and calls == []
    assert limit.attempt(attempts.keys_for("s-new", "b-" + "f" * 24, "198.51.100.1"), right).ok  # another address
    # Localhost (no address from Streamlit) is one key for the whole server; an IPv6 host holds a whole /64.
    assert attempts.keys_for("s", None, None) == {"session:s": 5, f"address:{attempts.LOCAL_ADDRESS}": 20}
    assert attempts.network("2001:db8:1:2::7") == attempts.network("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert attempts.network("::ffff:203.0.113.7") == "203.0.113.7" and attempts.network("odd") == "odd"


def test_the_count_is_on_disk_shared_by_every_process_and_names_no_address(tmp_path):
    clock = Clock()
    keys = attempts.keys_for("s1", BROWSER, "203.0.113.7")
    for _ in range(attempts.PER_MINUTE - 1):
        attempts.PassphraseAttempts(tmp_path, clock=clock).attempt(keys, lambda: False)
    # Another process (another object on the same runs root) continues the count.
    assert attempts.PassphraseAttempts(tmp_path, clock=clock).attempt(keys, lambda: False).wait_s > 0
    stored = (tmp_path / attempts.ATTEMPTS_FILE).read_text()
    assert "203.0.113.7" not in stored and BROWSER not in stored
    # Threads checking at once lose no attempt (the file lock): twenty from one address lock it exactly.
    other = tmp_path / "other"
    limit = attempts.PassphraseAttempts(other, clock=clock)
    outcomes = []

    def guess(worker: int) -> None:
        for n in range(5):
            outcomes.append(limit.attempt(attempts.keys_for(f"s{worker}-{n}", None, "198.51.100.9"), lambda: False))
    threads = [threading.Thread(target=guess, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for o in outcomes if o.locked == ("address",)) == 1 and outcomes[-1].wait_s > 0


def test_the_refusal_is_one_sentence():
    assert attempts.refusal(39.2) == "Too many wrong passphrases; try again in 40 s."
    assert attempts.refusal(0.2) == "Too many wrong passphrases; try again in 1 s."
    assert attempts.refusal(600) == "Too many wrong passphrases; try again in 10 min."


# --- Signed cookies, without Streamlit ----------------------------------------------------------------------
def test_a_browser_id_counts_only_with_its_signature():
    signed = cookies.sign_browser_id(BROWSER, SECRET)
    assert cookies.browser_id_from(signed, SECRET) == BROWSER
    forged_mac = signed.rpartition(".")[2]
    for bad in (None, "", BROWSER, "b-0000000000000000", f"{OTHER_BROWSER}.{forged_mac}",
                cookies.sign_browser_id(BROWSER, OTHER_SECRET), signed[:-1] + ("A" if signed[-1] != "A" else "B"),
                f"{BROWSER}.é", "u-" + "a" * 24 + "." + forged_mac, "../x.y"):
        assert cookies.browser_id_from(bad, SECRET) is None, bad
    with pytest.raises(ValueError):
        cookies.sign_browser_id("b-0000", SECRET)


def test_an_operator_token_holds_for_its_browser_and_passphrase_until_it_expires():
    now = 2_000_000.0
    token = cookies.operator_token(BROWSER, SECRET, PASSPHRASE, now)
    assert cookies.operator_expiry(token, SECRET, PASSPHRASE, BROWSER, now) == now + cookies.OPERATOR_TTL_S
    assert cookies.operator_expiry(token, SECRET, PASSPHRASE, BROWSER, now + 12 * 3600 - 1) is not None
    assert cookies.operator_expiry(token, SECRET, PASSPHRASE, BROWSER, now + 12 * 3600) is None  # expired
    assert cookies.operator_expiry(token, SECRET, "a new passphrase", BROWSER, now) is None  # passphrase changed
    assert cookies.operator_expiry(token, SECRET, PASSPHRASE, OTHER_BROWSER, now) is None  # another browser
    assert cookies.operator_expiry(token, OTHER_SECRET, PASSPHRASE, BROWSER, now) is None
    expiry, _, rest = token.partition(".")
    later = f"{int(expiry) + 86400}.{rest}"  # a longer role, written by hand
    assert cookies.operator_expiry(later, SECRET, PASSPHRASE, BROWSER, now) is None
    moved = f"{expiry}.{OTHER_BROWSER}.{rest.rpartition('.')[2]}"
    assert cookies.operator_expiry(moved, SECRET, PASSPHRASE, OTHER_BROWSER, now) is None
    for bad in (None, "", "x", "1.2.3", "9" * 5000 + f".{BROWSER}.x", f"²2.{BROWSER}.x", token + "é"):
        assert cookies.operator_expiry(bad, SECRET, PASSPHRASE, BROWSER, now) is None
    assert PASSPHRASE not in token


def test_the_server_secret_is_made_once_kept_private_or_taken_from_the_secrets(tmp_path):
    first = cookies.server_secret(tmp_path)
    assert len(first) == 32 and cookies.server_secret(tmp_path) == first
    path = tmp_path / cookies.SECRET_FILE
    if sys.platform != "win32":
        assert path.stat().st_mode & 0o077 == 0  # readable by the server's user only
    assert not list(tmp_path.glob(".*.tmp-*"))  # written atomically, nothing left beside it
    configured = "c" * 40
    assert cookies.server_secret(tmp_path, configured) == configured.encode()
    assert cookies.server_secret(tmp_path, "short") == first  # too short to trust: the file's


# --- Through the sidebar (AppTest) ---------------------------------------------------------------------------
def _audit(action: str) -> list[dict]:
    return [e for e in audit.read(runs_dir()) if e["action"] == action]


def _type(at, passphrase: str, label: str):
    at.text_input(key="access_passphrase").input(passphrase)
    return render(at, None, label)


def _role(at) -> str:
    found = next(str(m.value) for m in at.sidebar.markdown if "Role:**" in str(m.value))
    return found.split("**")[-1].strip()


def _cookie_writes(at) -> dict[str, str]:
    """The cookies this run asks the browser to keep ({} when it asks nothing)."""
    scripts = " ".join(str(getattr(h, "proto", h)) for h in at.get("html"))
    return dict(re.findall(r"document\.cookie = \\?'(cxr_\w+)=([^;]*);", scripts))


def _with_cookies(monkeypatch, sent: dict[str, str]) -> None:
    """What the browser sends with a new session (AppTest cannot seed st.context.cookies)."""
    import pages.ui.access as ui

    monkeypatch.setattr(ui, "_request_cookies", lambda: dict(sent))


@pytest.mark.slow
def test_the_sidebar_locks_out_after_five_wrong_passphrases_and_audits_them(monkeypatch):
    at = app({"operator_passphrase": PASSPHRASE})  # the Home page: the sidebar is on every page
    for n in range(attempts.PER_MINUTE - 1):
        _type(at, f"guess {n}", f"wrong {n}")
        assert "That passphrase is not the operator's." in text_of(at)
    _type(at, "guess 5", "wrong 5")
    assert "Too many wrong passphrases; try again in 30 s." in text_of(at)
    _type(at, PASSPHRASE, "the right one during the lockout")
    assert _role(at) == "visitor"
    assert re.search(r"Too many wrong passphrases; try again in \d+ s\.", text_of(at))
    me = at.session_state["access_browser_id"]
    wrong, locks = _audit("wrong passphrase"), _audit("lockout")
    assert len(wrong) == attempts.PER_MINUTE and {e["who"] for e in wrong} == {me}
    assert len(locks) == 1 and locks[0]["target"] == "session, browser for 30 s" and not _audit("sign in")
    assert PASSPHRASE not in (runs_dir() / audit.AUDIT_FILE).read_text()
    # After the wait, the right passphrase is checked again.
    later = time.time() + attempts.FIRST_WAIT_S + 1
    monkeypatch.setattr(attempts, "time", types.SimpleNamespace(time=lambda: later))
    _type(at, PASSPHRASE, "the right one after the wait")
    assert _role(at) == "operator" and _audit("sign in")[0]["who"] == me


@pytest.mark.slow
def test_the_operator_stays_the_operator_in_a_new_session_of_the_same_browser(monkeypatch):
    first = app({"operator_passphrase": PASSPHRASE})  # the Home page: the sidebar is on every page
    _type(first, PASSPHRASE, "operator")
    kept = _cookie_writes(first)
    browser = first.session_state["access_browser_id"]
    assert set(kept) == {"cxr_workspace", "cxr_operator"} and kept["cxr_operator"].split(".")[1] == browser
    assert PASSPHRASE not in kept["cxr_operator"]

    # A reload: a new session; the browser sends what it kept.
    _with_cookies(monkeypatch, kept)
    again = app({"operator_passphrase": PASSPHRASE})
    assert _role(again) == "operator" and again.session_state["access_browser_id"] == browser
    assert _cookie_writes(again) == {}  # the browser holds both already

    # Sign out: a visitor again, and the browser is asked to drop the operator cookie.
    again.button(key="access_sign_out").click()
    render(again, None, "home (signed out)")
    assert _role(again) == "visitor" and _cookie_writes(again).get("cxr_operator") == ""
    signed_in, signed_out = _audit("sign in")[0], _audit("sign out")[0]
    assert signed_in["who"] == signed_out["who"] == browser  # two sessions, one identity in the trail
    assert signed_out["role"] == "operator"

    # A new passphrase in the secrets ends every operator cookie made under the old one.
    changed = app({"operator_passphrase": "a brand new passphrase 9"})
    assert _role(changed) == "visitor" and _cookie_writes(changed).get("cxr_operator") == ""

    # The operator cookie beside another browser's id is worth nothing; so is an expired one.
    secret = cookies.server_secret(runs_dir())
    _with_cookies(monkeypatch, {**kept, "cxr_workspace": cookies.sign_browser_id(workspaces.new_browser_id(), secret)})
    assert _role(app({"operator_passphrase": PASSPHRASE})) == "visitor"
    expired = cookies.operator_token(browser, secret, PASSPHRASE, time.time() - cookies.OPERATOR_TTL_S - 1)
    _with_cookies(monkeypatch, {**kept, "cxr_operator": expired})
    assert _role(app({"operator_passphrase": PASSPHRASE})) == "visitor"
    # With the operator cookie, the operator's controls are there on the pages too.
    _with_cookies(monkeypatch, kept)
    operator = app({"operator_passphrase": PASSPHRASE})
    render(operator, "pages/dataset.py", "dataset (operator by cookie)")
    assert "make_practice" in {b.key for b in operator.button}
