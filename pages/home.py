"""Home: what the workbench does, the four steps and where this session stands on each."""
from collections.abc import Mapping

import streamlit as st

from cxr_core.runs.run_folder import Evaluation, Metrics, RunFolder, RunState
from pages.ui import charts, datasets, frame, models, session

frame.page_header(
    "Chest X-ray pneumonia workbench",
    "Train and inspect a pneumonia classifier for paediatric chest X-rays, step by step, and see "
    "where such models go wrong. Every step shows what the data and the model really do, so the "
    "numbers at the end can be trusted (or doubted) for the right reasons.",
)


def step_state() -> list[dict]:
    """The four steps with a one-line state for this session."""
    result = datasets.current_scan(where=st.empty()) if datasets.dataset_path() is not None else None
    if result is not None:
        counts = result.manifest["label"].value_counts()
        data_state = (f"**{st.session_state[session.KEY_DATASET]}**: {len(result.manifest):,} images "
                      f"({counts.get('NORMAL', 0):,} normal, {counts.get('PNEUMONIA', 0):,} pneumonia).")
        data_done = True
    else:
        data_state = "No data set chosen yet: use the Kermany release, upload a zip, or make the practice set."
        data_done = False

    aug_state = ("Reference settings (tiny rotation, horizontal flip, ±10 % brightness, 5 % shifts)."
                 if session.augment_is_default() else "Custom settings chosen in this session.")

    all_runs = models.all_runs()
    running = [r for r in all_runs if r.state is RunState.RUNNING]
    user_done = [r for r in all_runs if r.state is RunState.DONE and not r.is_demo]
    if running:
        train_state = f"Training now: **{running[0].run_id}**."
    elif user_done:
        train_state = f"{len(user_done)} finished run(s); newest **{user_done[0].run_id}**."
        useless = sum(r.learned_nothing for r in user_done)
        if useless:
            train_state += f" ⚠ {useless} of them learned nothing (validation AUC near 0.5)."
    else:
        train_state = "No run trained yet."

    selected = models.selected_run()
    if selected is not None and selected.learned_nothing:
        eval_state = f"⚠ **{models.run_label(selected)}** learned nothing: choose another run."
    elif selected is not None:
        eval_state = f"Ready with **{models.run_label(selected)}**."
    else:
        eval_state = "Needs a finished run (train one, or ship the demo run)."
    return [
        dict(n=1, title="Data", page="pages/dataset.py", done=data_done, state=data_state,
             what="Choose a data set; look at class imbalance, patients and splits."),
        dict(n=2, title="Augmentation", page="pages/augmentation.py", done=not session.augment_is_default(),
             state=aug_state, what="Pick realistic augmentation and see it applied live."),
        dict(n=3, title="Training", page="pages/training.py", done=bool(user_done), state=train_state,
             what="Fine-tune a pretrained network in the background; watch the curves."),
        dict(n=4, title="Evaluation & prediction", page="pages/evaluation.py", done=selected is not None,
             state=eval_state, what="Metrics, threshold, calibration, Grad-CAM; classify new images."),
    ]


st.subheader("The four steps")
columns = st.columns(4)
for column, step in zip(columns, step_state()):
    with column, st.container(border=True, height="stretch"):
        icon = ":material/check_circle:" if step["done"] else ":material/radio_button_unchecked:"
        st.markdown(f"#### {icon} {step['n']}. {step['title']}")
        st.caption(step["what"])
        st.markdown(step["state"])
        st.page_link(step["page"], label=f"Open {step['title'].split(' ')[0]}", icon=":material/arrow_forward:")

def honest_score() -> None:
    """The selected run's figures: on an external test set first, on its own split second."""
    summary = models.selected_run()
    if summary is None:
        return
    folder = RunFolder(summary.path)
    external = models.headline_evaluation(summary.path)  # never the class's locked test set for a visitor
    internal = (folder.metrics() or Metrics()).test_at_threshold
    st.subheader("How good is the model, honestly?")
    who = "The demo model" if summary.is_demo else f"Run {summary.run_id}"
    models.warn_if_useless(summary)
    if not models.task_of(summary.path).uses_threshold:  # the most probable class, no threshold
        subtype_score(who, external, internal)
    elif external is not None:
        cols = st.columns(4)
        intervals = external.intervals
        figures = (("roc_auc", f"AUC on {external.name}"), ("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"),
                   ("specificity", "Specificity"))
        for col, (name, label) in zip(cols, figures):
            interval = intervals.get(name)
            col.metric(label, charts.fmt_num(getattr(external, name)),
                       help="95 % interval: {:.3f}–{:.3f}".format(*interval) if interval else None)
            if interval:
                col.caption("95 % CI {:.3f}–{:.3f}".format(*interval))
        st.markdown(
            f"{who} on **{external.n} images of {external.name}**, a test set from outside its training data, at its "
            f"own threshold. On the test part of its own split it scores AUC {charts.fmt_num(internal.get('roc_auc'))}"
            f" and accuracy {charts.fmt_num(internal.get('accuracy'))}: a split of one collection shares "
            "patients' hospital, scanners and image preparation with training, so it flatters every model; "
            "the first figure is the one to believe. Each interval is how far the figure could move by chance "
            "alone on another test set of that size.")
    elif internal:
        st.markdown(
            f"{who} scores AUC **{charts.fmt_num(internal.get('roc_auc'))}** and accuracy "
            f"**{charts.fmt_num(internal.get('accuracy'))}** on the test part of its own split. That figure is "
            "optimistic: evaluate the run on a data set from elsewhere (the Evaluation page) for its honest score.")


def subtype_score(who: str, external: Evaluation | None, internal: Mapping) -> None:
    """The honest-score block of a run that tells normal, bacterial and viral pneumonia apart."""
    name, result = (external.name, external.figures) if external is not None else ("its own test part", internal)
    if not result:
        return
    test_set = f"on {name}" if external is not None else "(internal test)"
    cols = st.columns(4)
    cols[0].metric(f"Macro AUC {test_set}", charts.fmt_num(result.get("roc_auc")),
                   help="The mean over the three classes of each class's one-vs-rest ROC AUC.")
    cols[1].metric("Accuracy (3 classes)", charts.fmt_num(result.get("accuracy")))
    cols[2].metric("Bacterial vs viral accuracy",
                   charts.fmt_num((result.get("bacterial_vs_viral") or {}).get("accuracy")),
                   help="Among the pneumonia images: Kermany et al. (2018) report 0.907.")
    cols[3].metric("Pneumonia vs normal AUC",
                   charts.fmt_num((result.get("pneumonia_vs_normal") or {}).get("roc_auc")))
    if external is not None:
        st.markdown(
            f"{who} tells normal, bacterial and viral pneumonia apart. On **{result.get('n')} images of {name}**, "
            f"a test set from outside its training data, it predicts the most probable class. On the test part of "
            f"its own split it scores macro AUC {charts.fmt_num(internal.get('roc_auc'))} and accuracy "
            f"{charts.fmt_num(internal.get('accuracy'))}: a split of one collection flatters every model; the first "
            "figures are the ones to believe.")
    elif internal:
        st.markdown(
            f"{who} tells normal, bacterial and viral pneumonia apart: macro AUC "
            f"**{charts.fmt_num(internal.get('roc_auc'))}** and accuracy **{charts.fmt_num(internal.get('accuracy'))}**"
            " on the test part of its own split. That figure is optimistic: evaluate the run on a data set from "
            "elsewhere (the Evaluation page) for its honest score.")


honest_score()

with st.container(border=True):
    st.markdown("**Just want to try a model?** ")
    if models.demo_available():
        st.markdown("A demo run ships with the app: open **Predict** and upload a chest X-ray (JPEG, PNG or DICOM).")
    else:
        st.markdown("No demo model is installed yet: train a quick run on the Training page "
                    "(the synthetic practice set trains in about a minute), then use **Predict**.")
    st.page_link("pages/predict.py", label="Open Predict", icon=":material/radiology:")

st.subheader("What to keep in mind")
st.markdown(
    "- **Imbalance.** The Kermany release has about three pneumonia images for every normal one; "
    "a model can look accurate by mostly saying *pneumonia*. Watch specificity, not just accuracy.\n"
    "- **Leakage.** Many patients have several images. A random split by image puts the same child "
    "in training and test, which overstates accuracy; split by patient, or use the official test set.\n"
    "- **Threshold.** A probability becomes a diagnosis only through a threshold; moving it trades "
    "missed pneumonias against false alarms.\n"
    "- **Shortcuts.** A model learns whatever separates the classes in its training data, including "
    "things that are not the disease (which copy of the data, which scanner). The official Kermany test "
    "set is harder than any split of the training images; the Dataset page checks for such shortcuts."
)
st.warning(frame.DISCLAIMER, icon=":material/medical_information:")
