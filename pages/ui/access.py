"""The role of this session, from Streamlit's own mechanisms, and the audit trail of what it changes.

``st.user`` with an allow-list ``operators`` when the deployment has an identity provider
(``[auth]`` in secrets.toml), else the ``operator_passphrase`` typed in the sidebar, else (no
secrets: a local app) the single user is the operator. The rules live in ``cxr_core.hosting.access``.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.hosting import access, audit, resources, workspaces

log = logging.getLogger(__name__)

KEY_OPERATOR = "access_operator"     # True once the right passphrase was typed in this session
KEY_WRONG = "access_wrong"           # the last passphrase typed was wrong
KEY_PASSPHRASE = "access_passphrase"  # the password field; emptied as soon as it has been checked
KEY_SESSION_ID = "access_session_id"  # an anonymous id for the audit trail
KEY_BROWSER_ID = "access_browser_id"  # the workspace id of a visitor who is not signed in
KEY_UPLOADS_SEEN = "access_uploads_seen"  # upload ids already counted against the per-minute limit
COOKIE = "cxr_workspace"              # the browser keeps a visitor's workspace id in this cookie
COOKIE_MAX_AGE_S = 365 * 24 * 3600
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
                           passphrase_ok=bool(st.session_state.get(KEY_OPERATOR)))


def is_operator() -> bool:
    return role() == access.OPERATOR


def who() -> str:
    """The e-mail address of a signed-in user, else a visitor's workspace id, else an anonymous id of this session."""
    user = _user()
    if user.get("is_logged_in") and user.get("email"):
        return str(user["email"])
    ws = workspace()
    if ws:  # an anonymous visitor: the workspace id, which also names their runs' folder
        return ws
    if KEY_SESSION_ID not in st.session_state:
        st.session_state[KEY_SESSION_ID] = f"session-{uuid.uuid4().hex[:8]}"
    return st.session_state[KEY_SESSION_ID]


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
    if KEY_BROWSER_ID not in st.session_state:
        try:
            kept = st.context.cookies.get(COOKIE)
        except Exception:  # noqa: BLE001 (no cookies on this host or in a test)
            kept = None
        st.session_state[KEY_BROWSER_ID] = kept if workspaces.valid_id(kept) else workspaces.new_browser_id()
    return st.session_state[KEY_BROWSER_ID]


def keep_workspace_in_browser() -> None:
    """Ask the browser to keep a visitor's random workspace id (a cookie for a year), so that a reload or a
    later visit finds the same runs. Nothing for signed-in users, the operator or a local app."""
    ws = workspace()
    if ws is None or not ws.startswith("b-"):
        return
    try:
        if st.context.cookies.get(COOKIE) == ws:
            return  # the browser sent it with this session: it keeps it already
    except Exception:  # noqa: BLE001 (no cookies on this host or in a test)
        pass
    # On every run of this session (a run cut short by a rerun may never reach the browser): an invisible element.
    st.html(f"<script>document.cookie = '{COOKIE}={ws}; max-age={COOKIE_MAX_AGE_S}; path=/; SameSite=Lax';"
            "</script>", unsafe_allow_javascript=True, width="content")


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


def _check_passphrase() -> None:
    typed = st.session_state.get(KEY_PASSPHRASE) or ""
    ok = access.passphrase_matches(typed, str(secrets().get(access.PASSPHRASE_SECRET) or ""))
    st.session_state[KEY_OPERATOR], st.session_state[KEY_WRONG] = ok, bool(typed) and not ok
    st.session_state[KEY_PASSPHRASE] = ""  # the passphrase is not kept in the session


def _leave() -> None:
    st.session_state[KEY_OPERATOR] = False


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
    keep_workspace_in_browser()
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
            st.button("Leave the operator role", key="access_leave", on_click=_leave)
        else:
            st.text_input("Operator passphrase", type="password", key=KEY_PASSPHRASE, on_change=_check_passphrase,
                          help="The operator (the teacher) can delete runs and add data sets.")
            if st.session_state.get(KEY_WRONG):
                st.caption(":red[That passphrase is not the operator's.]")


def audit_table() -> None:
    """The newest entries of the audit trail, for the operator only."""
    if not is_operator():
        return
    entries = audit.read(limit=200)
    with st.expander(f"Audit trail ({len(entries)} newest entries)", icon=":material/history:"):
        if not entries:
            st.caption("Nothing yet: starting, cancelling and deleting runs and adding data sets are recorded here.")
            return
        st.dataframe(entries, hide_index=True, width="stretch",
                     column_order=["time", "who", "role", "action", "target"])
