"""Leaderboard: the class's runs scored on a locked test set nobody can look at, and which of them differ."""
import datetime as dt

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.core.labels import CLASSES, label_for
from cxr_core.hosting import classroom, leaderboard
from pages.ui import access, charts, datasets, frame, models

frame.page_header(
    "Leaderboard",
    "Every submission is scored by the server on the same **locked test set**: images nobody in the class can "
    "see, so no choice of model or threshold could have been tuned on them and the score is an honest one. "
    "A higher AUC is not always a better model: each figure comes with its 95 % interval, and the paired test "
    "on the same images (DeLong's) says which submissions this test set **cannot tell apart**; they share a "
    "group letter.",
)

FIGURE_LABELS = {"roc_auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
                 "specificity": "specificity"}
KEY_RUN = "lb_run"
KEY_POSTED = "lb_posted"  # the sentence after a submission, said once
OPERATOR_WHO = "operator"  # the operator's submissions: one submitter, whichever browser or address


def me() -> str:
    """Who this session submits as: a visitor's workspace (the same in every session of their browser or
    address), else the operator."""
    return access.workspace() or OPERATOR_WHO


@st.cache_data(show_spinner=False, max_entries=4)
def _board(root: str, stamp: float, locked: str) -> list:  # noqa: ARG001 (stamp, locked: the cache key)
    return leaderboard.board(root)


def board_now() -> list:
    """The standings, recomputed only when a submission is posted or the locked set changes."""
    root = datasets.runs_root()
    entries = leaderboard.board_dir(root) / leaderboard.ENTRIES_FILE
    stamp = entries.stat().st_mtime_ns if entries.is_file() else 0.0
    return _board(str(root), stamp, classroom.locked_name(root))


def with_interval(value, low, high) -> str:
    if value is None:
        return charts.MISSING
    return f"{value:.3f} ({low:.2f}–{high:.2f})" if low is not None and high is not None else f"{value:.3f}"


def when(stamp: str | None) -> str:
    try:
        return dt.datetime.fromisoformat(str(stamp)).strftime("%b %d %H:%M")
    except ValueError:
        return charts.MISSING


def board_table(rows: list[dict]) -> None:
    shown = pd.DataFrame([{
        "rank": r["rank"], "who": r["who"] + (" (you)" if r["you"] else ""), "run": r["run"],
        **{label: with_interval(r[name], r[f"{name}_low"], r[f"{name}_high"]) for name, label in FIGURE_LABELS.items()},
        "group": r["group"],
        "p vs #1": charts.MISSING if r["p_vs_leader"] is None else f"{r['p_vs_leader']:.2g}",
        "submitted": when(r["submitted"]),
    } for r in rows])
    figure = st.column_config.TextColumn(width=108)
    charts.table(shown, hide_index=True, width="stretch", key="lb_table", column_config={
        "rank": st.column_config.NumberColumn(width=40), "who": st.column_config.TextColumn(width=135),
        "run": st.column_config.TextColumn(width=125), **dict.fromkeys(FIGURE_LABELS.values(), figure),
        "group": st.column_config.TextColumn(width=50, help="Submissions sharing a letter cannot be told apart on "
                                                           "this test set (DeLong p ≥ 0.05 against the group's best)."),
        "p vs #1": st.column_config.TextColumn(width=60, help="DeLong's test of this AUC against the leader's on "
                                                             "the same images: below 0.05, beyond chance."),
        "submitted": st.column_config.TextColumn(width=85, help="UTC")})
    tied = [r for r in rows if r["tied_with_leader"] and r["roc_auc"] is not None]
    if len(tied) > 1:
        gap = rows[0]["roc_auc"] - min(r["roc_auc"] for r in tied)
        st.success(f"**{len(tied)} submissions share the top group (A)**: their AUCs differ by up to {gap:.3f}, "
                   f"which on these {rows[0]['n']} images is within what chance alone gives. The leader's lead "
                   "over them is no lead.", icon=":material/balance:")
    how = "by patient" if rows[0].get("intervals_by") == "patient" else "by image"
    st.caption(f"Ranked by ROC AUC on the {rows[0]['n']} images of the locked test set, each at the run's own "
               f"threshold (chosen on its validation images). Intervals: 95 % bootstrap, resampled {how}. Group "
               "letters: the leader heads A and every submission the paired test cannot tell apart from it shares "
               "A; the best one that differs from every earlier head starts the next letter.")


def board_chart(rows: list[dict]) -> None:
    rows = [r for r in rows if r["roc_auc"] is not None]
    if not rows:
        return
    fig = go.Figure()
    palette = ["#2e6f9e", "#e08a1e", "#6a4c93", "#2e9e6a", "#d1495b"]
    for letter in sorted({r["group"][0] for r in rows}):
        part = [r for r in rows if r["group"][0] == letter]
        fig.add_scatter(
            x=[f"#{r['rank']} {r['who']}" for r in part], y=[r["roc_auc"] for r in part], mode="markers",
            name=f"group {letter}", marker=dict(size=12, color=palette[(ord(letter) - 65) % len(palette)]),
            error_y=dict(type="data", symmetric=False,
                         array=[(r["roc_auc_high"] or r["roc_auc"]) - r["roc_auc"] for r in part],
                         arrayminus=[r["roc_auc"] - (r["roc_auc_low"] or r["roc_auc"]) for r in part]),
            text=[r["run"] for r in part], hovertemplate="%{x}<br>%{text}<br>AUC %{y:.3f}<extra></extra>")
    low = min((r["roc_auc_low"] or r["roc_auc"]) for r in rows)
    fig.update_yaxes(title="ROC AUC (95 % interval)", range=[max(0.0, low - 0.05), 1.01])
    fig.update_xaxes(categoryorder="array", categoryarray=[f"#{r['rank']} {r['who']}" for r in rows])
    st.plotly_chart(charts.style(fig, 340, title="AUC of each submission on the locked test set"), key="lb_chart")


def submit_control(settings: classroom.Classroom) -> None:
    st.subheader("Submit a run")
    posted = st.session_state.pop(KEY_POSTED, None)
    if posted:
        st.success(posted, icon=":material/check_circle:")
    role = access.role()
    # A visitor posts their own runs; the operator posts shared runs only (a baseline), never a visitor's as theirs.
    owner = "" if access.is_operator() else access.workspace()
    candidates = [s for s in models.finished_runs() if owner is not None and s.owner == owner
                  and models.task_of(s.path).uses_threshold and models.task_of(s.path).is_binary]
    left = leaderboard.left_today(me(), role, datasets.runs_root())
    if left is not None:
        st.caption(f"You have **{left} of {settings.daily_submissions}** submissions left today (the count starts "
                   "again at midnight UTC). Submit the run you believe in, not every run you have.")
    if not candidates:
        st.info("You have no finished pneumonia run of your own yet: train one on the Training page, then submit it "
                "here." if left is not None else "There is no finished shared pneumonia run to post as a baseline.",
                icon=":material/info:")
        return
    by_path = {str(s.path): s for s in candidates}
    if st.session_state.get(KEY_RUN) not in by_path:
        st.session_state.pop(KEY_RUN, None)
    chosen = st.selectbox("Your run" if left is not None else "A shared run (a baseline for the class)", list(by_path),
                          key=KEY_RUN, format_func=lambda p: models.run_label(by_path[p]))
    if left == 0:
        st.info(leaderboard.limit_sentence(settings.daily_submissions), icon=":material/hourglass_top:")
        return
    if not st.button("Submit to the board", type="primary", icon=":material/send:", key="lb_submit"):
        return
    bar = st.progress(0.0, text="Scoring on the locked test set...")
    try:
        entry = leaderboard.submit(
            chosen, who=me(), role=role, workspace=access.workspace(), data_root=datasets.data_root(),
            root=datasets.runs_root(), predictor=models.load_predictor(chosen),
            on_progress=lambda d, t: bar.progress(min(1.0, d / max(t, 1)), text=f"Scored {d} of {t} images"))
    except CxrError as error:
        bar.empty()
        st.error(str(error), icon=":material/block:")
        return
    bar.empty()
    access.record("submit", f"{entry['run']} (AUC {charts.fmt_num(entry['roc_auc'])})")
    # Said after the rerun, which shows the new row and the submissions left.
    st.session_state[KEY_POSTED] = (f"Posted {entry['run']}: AUC {charts.fmt_num(entry['roc_auc'])} on the locked "
                                    "test set.")
    st.rerun()


def per_image(rows: list[dict], settings: classroom.Classroom) -> None:
    """A submission's per-image results: the operator's always, a visitor's own once revealed."""
    operator = access.is_operator()
    mine = rows if operator else [r for r in rows if r["you"]]
    if not mine:
        return
    if not operator and not settings.revealed:
        st.caption("The per-image results stay hidden until the operator reveals them at the end.")
        return
    with st.expander("Per-image results" + ("" if operator else " of your submissions"), icon=":material/grid_on:"):
        by_id = {r["id"]: r for r in mine}
        chosen = st.selectbox("Submission", list(by_id), key="lb_per_image",
                              format_func=lambda i: f"#{by_id[i]['rank']} {by_id[i]['who']}: {by_id[i]['run']}")
        try:
            table = leaderboard.own_predictions(chosen, me(), access.role(), datasets.runs_root())
        except CxrError as error:
            st.info(str(error), icon=":material/lock:")
            return
        threshold = float(by_id[chosen]["threshold"] or 0.5)
        shown = pd.DataFrame({"image": table["image"], "truly": table["y"].astype(int).map(CLASSES.__getitem__),
                              "probability": table["probability"],
                              "called": table["probability"].map(lambda p: label_for(p, threshold))})
        wrong = int((shown["truly"] != shown["called"]).sum())
        st.caption(f"{wrong} of {len(shown)} images called wrongly at the run's threshold {threshold:.3f}.")
        charts.table(shown, hide_index=True, width="stretch",
                     column_config={"probability": st.column_config.NumberColumn(format="%.3f")})


def _save_settings() -> None:
    try:
        before = classroom.read(datasets.runs_root())
        name = st.session_state.get("lb_locked") or ""
        daily = int(st.session_state.get("lb_daily") or classroom.DEFAULT_DAILY)
        classroom.update(datasets.runs_root(), locked_test_set=name, daily_submissions=daily)
    except CxrError as error:
        st.session_state["lb_notice"] = str(error)
        return
    if name != before.locked_test_set:
        access.record("locked test set", name or "none")
    if daily != before.daily_submissions:
        access.record("daily submissions", str(daily))


def _save_reveal() -> None:
    revealed = bool(st.session_state.get("lb_reveal"))
    try:
        classroom.update(datasets.runs_root(), revealed=revealed)
    except CxrError as error:
        st.session_state["lb_notice"] = str(error)
        return
    access.record("reveal", "per-image results shown to their submitters" if revealed else "hidden again")


def operator_panel(settings: classroom.Classroom, rows: list[dict]) -> None:
    """The operator's controls: the locked set, the daily limit, the reveal and the CSV."""
    st.subheader("Operator: the class's test set")
    names = datasets.all_datasets()
    options = ["", *names] if settings.locked_test_set in ("", *names) else ["", settings.locked_test_set, *names]
    if st.session_state.get("lb_locked") not in options:
        st.session_state["lb_locked"] = settings.locked_test_set
    st.session_state.setdefault("lb_daily", settings.daily_submissions)
    with st.form("lb_settings", border=True):
        left, right = st.columns([2, 1])
        left.selectbox("Locked test set", options, key="lb_locked",
                       format_func=lambda n: n or "None: no leaderboard",
                       help="A data set of the data folder that visitors never see: not in the folder box, not as "
                            "an external test set, not on the Evaluation page. Choose one nobody has trained on.")
        right.number_input("Submissions per visitor per day (UTC)", 1, classroom.MAX_DAILY, step=1, key="lb_daily")
        st.form_submit_button("Save", icon=":material/save:", on_click=_save_settings)
    notice = st.session_state.pop("lb_notice", None)
    if notice:
        st.error(notice, icon=":material/error:")
    st.session_state["lb_reveal"] = settings.revealed
    st.toggle("Reveal the per-image results to their submitters (at the end of the course)", key="lb_reveal",
              on_change=_save_reveal)
    if rows:
        st.download_button("Download the board (CSV)", leaderboard.board_csv(board_now()), icon=":material/download:",
                           file_name=f"leaderboard-{settings.locked_test_set}.csv", mime="text/csv", key="lb_csv")
    access.audit_table()


settings = classroom.read(datasets.runs_root())
locked = settings.locked_test_set
rows: list[dict] = []
if not locked:
    st.info("No locked test set has been chosen yet, so there is no board: "
            + ("choose one under **Operator** below (a data set nobody trains on)." if access.is_operator() else
               "the operator of this app (your teacher) chooses one on this page."), icon=":material/lock_open:")
elif not (datasets.data_root() / locked).is_dir():
    st.warning("The locked test set is no longer on this server, so the board takes no submissions; "
               + ("choose another below." if access.is_operator() else "ask the operator."), icon=":material/warning:")
else:
    submit_control(settings)
    st.subheader("The board")
    rows = leaderboard.board_rows(board_now(), me=me())
    if not rows:
        st.info("No submissions yet: the first finished run submitted above opens the board.", icon=":material/info:")
    else:
        board_table(rows)
        board_chart(rows)
        per_image(rows, settings)
if access.is_operator():
    st.divider()
    operator_panel(settings, rows)
st.caption(frame.DISCLAIMER)
