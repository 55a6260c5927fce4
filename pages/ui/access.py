"""The role of this session, from Streamlit's own mechanisms, and the audit trail of what it changes.

``st.user`` with an allow-list ``operators`` when the deployment has an identity provider
(``[auth]`` in secrets.toml), else the ``operator_passphrase`` typed in the sidebar, else (no
secrets: a local app) the single user is the operator. The rules live in ``cxr_core.hosting.access``;
wrong passphrases are limited by ``cxr_core.hosting.attempts``, and what the browser keeps (its id, the
operator role for 12 h) is signed by ``cxr_core.hosting.cookies``.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.hosting import access, attempts, audit, cookies, resources, workspaces
from cxr_core.runs import registry as runs

log = logging.getLogger(__name__)

KEY_OPERATOR = "access_operator"     # this session's signed operator token ("": signed out; absent: the cookie's)
KEY_NOTICE = "access_notice"         # the sentence after the last passphrase typed (wrong, locked out, busy)
KEY_PASSPHRASE = "access_passphrase"  # the password field; emptied as soon as it has been checked
KEY_SESSION_ID = "access_session_id"  # an anonymous id of this session (the audit trail, the attempts' limit)
KEY_BROWSER_ID = "access_browser_id"  # this browser's id on a hosted app (a visitor's workspace when not signed in)
KEY_UPLOADS_SEEN = "access_uploads_seen"  # upload ids already counted against the per-minute limit
COOKIE = "cxr_workspace"              # the browser keeps its signed id in this cookie
OPERATOR_COOKIE = "cxr_operator"      # ... and the operator role, signed, for 12 h
COOKIE_MAX_AGE_S = 365 * 24 * 3600
LOCKED = "locked"                     # KEY_NOTICE during a lockout: the sentence says how long is left
WRONG_SENTENCE = "That passphrase is not the operator's."
SHARED_RUN_SENTENCE = access.SHARED_RUN_SENTENCE


def secrets() -> dict[str, Any]:
    """The app's secrets, or an empty dict when there is no secrets.toml (no error shown)."""
    try:
        return st.secrets.to_dict() if st.secrets.load_if_toml_exists() else {}
    except Exception:  # noqa: BLE001 (an unreadable secrets.toml: run as a local app, as without one)
        log.warning("secrets.toml could not be read; running without roles.")
        return {}


def _user() -> dict:
    try:
        return dict(st.user.to_dict())
    except Exception:  # noqa: BLE001 (no user information on this host)
        return {}


def mode() -> str:
    return access.mode(secrets())


def role() -> str:
    found = secrets()
    how = access.mode(found)
    user = _user()
    email = user.get("email") if user.get("is_logged_in", how != access.LOGIN) else None
    return access.role_for(how, email=email, operators=found.get("operators"),
                           passphrase_ok=how == access.PASSPHRASE and _operator_until(found) is not None)


def is_operator() -> bool:
    return role() == access.OPERATOR


def who() -> str:
    """The e-mail address of a signed-in user, else this browser's id on a hosted app (the same in every session
    of the browser, as a visitor or as the operator), else an anonymous id of this session."""
    user = _user()
    if user.get("is_logged_in") and user.get("email"):
        return str(user["email"])
    if hosted():
        return browser_id()
    return _session_id()


def _session_id() -> str:
    if KEY_SESSION_ID not in st.session_state:
        st.session_state[KEY_SESSION_ID] = f"session-{uuid.uuid4().hex[:8]}"
    return st.session_state[KEY_SESSION_ID]


def _request_cookies() -> Mapping[str, str]:
    """The cookies the browser sent when this session began."""
    try:
        return st.context.cookies
    except Exception:  # noqa: BLE001 (no cookies on this host or in a test)
        return {}


def _client_address() -> str | None:
    """The address of this session's connection; None on localhost (or behind a proxy on the same host)."""
    try:
        return st.context.ip_address
    except Exception:  # noqa: BLE001 (no connection on this host or in a test)
        return None


@st.cache_resource(show_spinner=False)
def _cached_secret(root: str, configured: str) -> bytes:
    return cookies.server_secret(root, configured or None)


def _secret(found: Mapping[str, Any] | None = None) -> bytes:
    found = secrets() if found is None else found
    return _cached_secret(str(runs.runs_root().path), str(found.get("cookie_secret") or ""))


def browser_id() -> str:
    """This browser's id on a hosted app: the one its cookie carries when the signature holds, else a fresh one
    (a cookie written by hand, guessed or copied without its signature gets nothing)."""
    if KEY_BROWSER_ID not in st.session_state:
        kept = cookies.browser_id_from(_request_cookies().get(COOKIE), _secret())
        st.session_state[KEY_BROWSER_ID] = kept or workspaces.new_browser_id()
    return st.session_state[KEY_BROWSER_ID]


def _operator_until(found: Mapping[str, Any]) -> float | None:
    """When this session's operator role ends (the signed token typed here or kept by the browser), or None."""
    if KEY_OPERATOR not in st.session_state:
        st.session_state[KEY_OPERATOR] = _request_cookies().get(OPERATOR_COOKIE) or ""
    token = st.session_state[KEY_OPERATOR]
    if not token:
        return None
    return cookies.operator_expiry(token, _secret(found), str(found.get(access.PASSPHRASE_SECRET) or ""),
                                   browser_id(), time.time())


def hosted() -> bool:
    """Whether this app has roles (secrets configured); a local app has one user and no workspaces."""
    return mode() != access.LOCAL


def workspace() -> str | None:
    """This visitor's workspace id on a hosted app (from the signed-in address, else an id kept in the
    browser); None for the operator and on a local app, whose runs are the shared ones."""
    if not hosted() or is_operator():
        return None
    user = _user()
    if user.get("is_logged_in") and user.get("email"):
        return workspaces.id_for_email(str(user["email"]))
    return browser_id()


def _cookie_script(name: str, value: str, max_age_s: int) -> str:
    # Only ids, digits, '.' and base64url characters reach here: nothing to escape. Secure over https only,
    # where the page knows it best; Strict: no other site's page sends it along.
    return (f"document.cookie = '{name}={value}; max-age={max_age_s}; path=/; SameSite=Strict' + "
            "(location.protocol === 'https:' ? '; Secure' : '');")


def keep_in_browser() -> None:
    """Ask the browser to keep its signed id (a year) and, for the operator, the signed role until it ends, or
    to drop an operator cookie that no longer holds (signed out, expired, another passphrase). Nothing on a
    local app or for a signed-in user, whose address is their identity."""
    found = secrets()
    how = access.mode(found)
    user = _user()
    if how == access.LOCAL or (user.get("is_logged_in") and user.get("email")):
        return
    wanted = {COOKIE: (cookies.sign_browser_id(browser_id(), _secret(found)), COOKIE_MAX_AGE_S)}
    if how == access.PASSPHRASE:
        until = _operator_until(found)
        wanted[OPERATOR_COOKIE] = ((st.session_state[KEY_OPERATOR], int(until - time.time())) if until
                                   else ("", 0))
    sent = _request_cookies()
    scripts = [_cookie_script(name, value, age) for name, (value, age) in wanted.items()
               if (sent.get(name) or "") != value]
    if scripts:
        # On every run of this session (a run cut short by a rerun may never reach the browser): an invisible element.
        st.html("<script>" + " ".join(scripts) + "</script>", unsafe_allow_javascript=True, width="content")


def runs_owner_label(owner: str) -> str:
    """How the runs table names a run's owner for this session."""
    if not owner:
        return "shared"
    return "yours" if owner == workspace() else f"workspace {owner[:10]}"


def can_delete(summary) -> bool:
    """Whether this session may delete (or change) a run of the runs list."""
    return access.can_delete_run(role(), summary.owner, workspace())


def can_change_run(run_dir) -> bool:
    """Like ``can_delete``, from a run folder (its workspace is where it lies)."""
    return access.can_delete_run(role(), workspaces.owner_of(run_dir) or "", workspace())


@st.cache_resource(show_spinner=False)
def _upload_limiter(per_minute: int) -> resources.RateLimiter:
    return resources.RateLimiter(per_minute)  # one per server: a visitor's sessions share it


def uploads_per_minute() -> int:
    """The per-visitor limit; a malformed operator setting is one sentence and the default applies."""
    try:
        return resources.uploads_per_minute()
    except CxrError as error:
        st.warning(str(error), icon=":material/settings:")
        return resources.uploads_per_minute(env={})


def admitted_uploads(files: list) -> list:
    """The uploaded files this visitor may have classified now: on a hosted app each new file counts
    against the per-minute limit of uploads; beyond it the page says so in one sentence and the rest wait."""
    if not files or not hosted():  # on your own machine nobody else shares it: no limit
        return list(files or [])
    limiter = _upload_limiter(uploads_per_minute())
    seen = st.session_state.setdefault(KEY_UPLOADS_SEEN, set())
    kept, refused = [], False
    for file in files:
        key = getattr(file, "file_id", None) or f"{file.name}:{getattr(file, 'size', '')}"
        if key in seen:
            kept.append(file)
        elif limiter.allow(workspace() or who()):
            seen.add(key)
            kept.append(file)
        else:
            refused = True
    if refused:
        st.warning(limiter.refusal(), icon=":material/speed:")
    return kept


def allowed(action: str) -> bool:
    """Whether this session may do ``action``; when not, the page says so in one sentence."""
    if access.can(role(), action):
        return True
    st.info(access.OPERATOR_ONLY[action], icon=":material/lock:")
    return False


def record(action: str, target: str) -> None:
    """Add an entry to the audit trail; a log that cannot be written does not undo the action."""
    try:
        audit.record(action, target, role=role(), who=who())
    except OSError as error:
        log.warning("The audit trail could not be written: %s", error)


@st.cache_resource(show_spinner=False)
def _attempts(root: str) -> attempts.PassphraseAttempts:
    return attempts.PassphraseAttempts(root)


def _attempt_keys() -> dict[str, int]:
    return attempts.keys_for(_session_id(), browser_id(), _client_address())


def _check_passphrase() -> None:
    typed = st.session_state.get(KEY_PASSPHRASE) or ""
    st.session_state[KEY_PASSPHRASE] = ""  # the passphrase is not kept in the session
    if not typed:
        return
    found = secrets()
    expected = str(found.get(access.PASSPHRASE_SECRET) or "")
    try:
        outcome = _attempts(str(runs.runs_root().path)).attempt(
            _attempt_keys(), lambda: access.passphrase_matches(typed, expected))
    except CxrError as error:
        st.session_state[KEY_NOTICE] = str(error)
        return
    if outcome.ok:
        st.session_state[KEY_OPERATOR] = cookies.operator_token(browser_id(), _secret(found), expected, time.time())
        st.session_state.pop(KEY_NOTICE, None)
        record("sign in", "operator")
        return
    if outcome.checked:
        record("wrong passphrase", "operator")
        if outcome.locked:
            record("lockout", f"{', '.join(outcome.locked)} for {outcome.wait_s:.0f} s")
    st.session_state[KEY_NOTICE] = LOCKED if outcome.wait_s > 0 else WRONG_SENTENCE


def _notice() -> str | None:
    """The sentence under the passphrase field: wrong, how long a lockout has left, or why it was not checked."""
    notice = st.session_state.get(KEY_NOTICE)
    if notice != LOCKED:
        return notice
    try:
        wait = _attempts(str(runs.runs_root().path)).wait_s(_attempt_keys())
    except CxrError as error:
        return str(error)
    if wait <= 0:
        st.session_state.pop(KEY_NOTICE, None)
        return None
    return attempts.refusal(wait)


def _sign_out() -> None:
    record("sign out", "operator")  # while still the operator
    st.session_state[KEY_OPERATOR] = ""


def _providers(auth: Mapping) -> list[str | None]:
    """The providers to offer: None for the default one, else each ``[auth.<name>]`` section."""
    named = [name for name, value in auth.items() if isinstance(value, Mapping)]
    return [None] if "client_id" in auth or not named else named


def sidebar_panel() -> None:
    """The role of this session and how to change it (nothing in a local app)."""
    found = secrets()
    how = access.mode(found)
    if how == access.LOCAL:
        return
    current = role()
    keep_in_browser()
    with st.container(border=True):
        st.markdown(f"**Role:** {current}")
        if current == access.VISITOR:
            st.caption("Your runs go to your own workspace; the operator's runs are shared with everyone.")
        if how == access.LOGIN:
            user = _user()
            if user.get("is_logged_in"):
                st.caption(f"Signed in as {user.get('email') or 'an unnamed user'}.")
                if st.button("Log out", key="access_logout", icon=":material/logout:"):
                    st.logout()
            else:
                for provider in _providers(found.get("auth") or {}):
                    label = "Log in" if provider is None else f"Log in with {provider}"
                    if st.button(label, key=f"access_login_{provider or 'default'}", icon=":material/login:"):
                        st.login(provider) if provider else st.login()
        elif current == access.OPERATOR:
            st.caption("This browser stays the operator for 12 hours, or until you sign out.")
            st.button("Sign out", key="access_sign_out", icon=":material/logout:", on_click=_sign_out)
        else:
            st.text_input("Operator passphrase", type="password", key=KEY_PASSPHRASE, on_change=_check_passphrase,
                          help="The operator (the teacher) can delete runs and add data sets.")
            notice = _notice()
            if notice:
                st.caption(f":red[{notice}]")


def audit_table() -> None:
    """The newest entries of the audit trail, for the operator only."""
    if not is_operator():
        return
    entries = audit.read(limit=200)
    with st.expander(f"Audit trail ({len(entries)} newest entries)", icon=":material/history:"):
        if not entries:
            st.caption("Nothing yet: starting, cancelling and deleting runs, adding data sets and signing in as the "
                       "operator are recorded here.")
            return
        st.dataframe(entries, hide_index=True, width="stretch",
                     column_order=["time", "who", "role", "action", "target"])
