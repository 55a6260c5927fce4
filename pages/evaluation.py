"""Evaluation: how good is a finished run, at which threshold, how calibrated, and where it fails."""
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.core import metrics as evaluate
from cxr_core.core.calibration import IDENTITY, Calibration, expected_calibration_error
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import CLASSES, label_for
from cxr_core.core.tasks import get_task
from cxr_core.evaluation import external, paired
from cxr_core.hosting import classroom
from cxr_core.inference.predictor import map_caption
from cxr_core.runs.run_folder import RunFolder, TestSet
from pages.ui import access, charts, datasets, frame, models, multiclass, session

frame.page_header(
    "Evaluation",
    "A model is judged on **test images it never saw during training**. Accuracy alone misleads when "
    "the classes are imbalanced, so look at sensitivity (pneumonias found) and specificity (normal "
    "films left alone), the ROC and precision-recall curves, and whether a predicted 80 % really "
    "means pneumonia four times out of five (calibration). For a three-class run (normal / bacterial / "
    "viral) the question is which classes it confuses: the per-class figures and the 3x3 matrix say so.",
)

MAX_GALLERY = 6


def no_run_message() -> None:
    st.info("No finished run yet. Train one on the **Training** page; its test-set results appear here "
            "when it is done.", icon=":material/info:")
    st.page_link("pages/training.py", label="Go to Training", icon=":material/model_training:")


def test_predictions(run_dir: Path) -> pd.DataFrame:
    preds = RunFolder(run_dir).read_predictions()
    if "split" in preds.columns:
        preds = preds[preds["split"] == "test"]
    return preds.dropna(subset=["y", "probability"])


def test_sets(summary) -> dict[str, TestSet]:
    """The run's test sets by their label, the honest one first (``RunFolder.test_sets``)."""
    return {(f"external: {found.name}" if found.external else "internal: the run's own test part"): found
            for found in RunFolder(summary.path).test_sets()
            if not (found.external and datasets.hidden_evaluation(found.name))}  # the locked set: never a visitor's


def headline(chosen: TestSet, summary) -> None:
    test = chosen.figures
    cols = st.columns(5)
    kind = "External" if chosen.external else "Internal"
    cols[0].metric(f"{kind} ROC AUC", charts.fmt_num(test.get("roc_auc")),
                   help="Probability that a random pneumonia image scores higher than a random normal one.")
    cols[1].metric("Sensitivity", charts.fmt_num(test.get("sensitivity")), help="Share of pneumonias called PNEUMONIA.")
    cols[2].metric("Specificity", charts.fmt_num(test.get("specificity")), help="Share of normal films called NORMAL.")
    cols[3].metric("Accuracy", charts.fmt_num(test.get("accuracy")))
    rule = chosen.rule or "validation"
    cols[4].metric("Threshold", charts.fmt_num(chosen.threshold),
                   help=f"Chosen on the run's validation images ({rule} rule), never on a test set.")
    n = test.get("n")
    if n:
        bootstrapped = chosen.intervals if chosen.external else {}
        # The "few test images" rule reads sensitivity and specificity: bootstrapped when stored, else Wilson.
        intervals = ({k: v for k, v in bootstrapped.items() if k in ("sensitivity", "specificity")}
                     or evaluate.rate_intervals(test))
        spread = "; ".join(f"{name} {low:.2f}–{high:.2f}" for name, (low, high) in intervals.items())
        st.caption(f"{models.test_set_caption(chosen, summary)} {test.get('n_positive', '?')} pneumonia, "
                   f"{test.get('n_negative', '?')} normal."
                   + (f" 95 % intervals: {spread}." if spread and not bootstrapped else ""))
        if bootstrapped:
            st.caption(interval_line(test, bootstrapped, chosen.intervals_by))
        if evaluate.intervals_are_wide(intervals):
            # The rule is the width of the intervals, not a count: 500 images with 30 normal ones are few.
            widest = max((high - low) / 2 for low, high in intervals.values())
            st.warning(f"Few test images: sensitivity or specificity is known only to within ±{widest:.2f} "
                       f"(95 % interval, wider than ±{evaluate.WIDE_INTERVAL:.2f}), so runs that differ by less "
                       "cannot be told apart on this test set.", icon=":material/warning:")


INTERVAL_NAMES = {"roc_auc": "ROC AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
                  "specificity": "specificity"}


def interval_line(test, intervals: dict[str, tuple[float, float]], by: str | None) -> str:
    """Each figure with its stored 95 % interval, and what such an interval means."""
    how = ", by patient" if by == "patient" else ""
    figures = "; ".join(f"{label} {charts.fmt_num(test.get(name))} (95 % CI {low:.2f}–{high:.2f}{how})"
                        for name, label in INTERVAL_NAMES.items() if name in intervals
                        for low, high in [intervals[name]])
    meaning = ("The interval is how far each figure could move by chance alone on another test set of this size "
               "from the same source; runs whose intervals overlap cannot be told apart here.")
    if by == "patient":
        meaning += " A child's images were resampled together, as films of one child are not independent evidence."
    return f"{figures}. {meaning}"


@st.fragment
def threshold_explorer(y: np.ndarray, p: np.ndarray, chosen: TestSet, key: str) -> None:
    """The threshold slider: sensitivity, specificity and the confusion matrix follow it."""
    st.subheader("Choose the threshold")
    st.markdown("Lowering the threshold finds more pneumonias (higher sensitivity) at the price of more "
                "false alarms (lower specificity). A screening tool wants high sensitivity.")
    # The slider starts at the run's own threshold whenever the run or the test set changes, and when
    # coming back to one: its state is set here, never left over from another run's slider.
    if st.session_state.get(KEY_THRESHOLD_FOR) != key or key not in st.session_state:
        st.session_state[key] = round(min(max(chosen.threshold, 0.0), 1.0), 3)
        st.session_state[KEY_THRESHOLD_FOR] = key
    threshold = st.slider("Threshold", 0.0, 1.0, step=0.001, key=key, format="%.3f",
                          help="An image is called PNEUMONIA when its probability is at or above this.")
    live = evaluate.binary_metrics(y, p, threshold)
    left, right = st.columns([1, 1])
    with left:
        a, b = st.columns(2)
        a.metric("Sensitivity", f"{live['sensitivity']:.3f}",
                 delta=f"{live['sensitivity'] - _at(chosen, 'sensitivity'):+.3f} vs run threshold")
        b.metric("Specificity", f"{live['specificity']:.3f}",
                 delta=f"{live['specificity'] - _at(chosen, 'specificity'):+.3f} vs run threshold")
        table = charts.metrics_table({"at 0.5": chosen.at_05 or None, "at run threshold": chosen.figures,
                                      f"at {threshold:.3f}": live})
        charts.table(table, width="stretch")
    with right:
        st.plotly_chart(charts.confusion_figure(live["confusion_matrix"], f"Confusion matrix at {threshold:.2f}"),
                        key=f"{key}_cm")
    curves(y, p, threshold, live, key)


def _at(chosen: TestSet, name: str) -> float:
    return float(chosen.figures.get(name) or 0.0)


def curves(y, p, threshold: float, live: dict, key: str) -> None:
    roc = evaluate.roc_points(y, p)
    pr = evaluate.pr_points(y, p)
    left, right = st.columns(2)
    fig = go.Figure()
    fig.add_scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name=f"ROC (AUC {charts.fmt_num(live['roc_auc'])})")
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="chance")
    fig.add_scatter(x=[1 - live["specificity"]], y=[live["sensitivity"]], mode="markers",
                    marker=dict(size=12, color="#d1495b"), name=f"threshold {threshold:.2f}")
    fig.update_xaxes(title="1 − specificity (false-positive rate)", range=[0, 1])
    fig.update_yaxes(title="sensitivity", range=[0, 1.02])
    left.plotly_chart(charts.style(fig, 340, title="ROC curve"), key=f"{key}_roc")
    fig = go.Figure()
    fig.add_scatter(x=pr["recall"], y=pr["precision"], mode="lines", name=f"PR (AP {charts.fmt_num(live['pr_auc'])})")
    base = float(np.mean(y)) if len(y) else 0.0
    fig.add_scatter(x=[0, 1], y=[base, base], mode="lines", line=dict(dash="dot", color="gray"),
                    name=f"prevalence {base:.2f}")
    fig.add_scatter(x=[live["sensitivity"]], y=[live["precision"]], mode="markers",
                    marker=dict(size=12, color="#d1495b"), name=f"threshold {threshold:.2f}")
    fig.update_xaxes(title="recall (sensitivity)", range=[0, 1])
    fig.update_yaxes(title="precision", range=[0, 1.02])
    right.plotly_chart(charts.style(fig, 340, title="Precision-recall curve"), key=f"{key}_pr")


def calibration(y, p, chosen: TestSet, calibration: Calibration) -> None:
    st.subheader("Calibration")
    bins = evaluate.calibration_bins(y, p, n_bins=10)
    brier = float(np.mean((p - y) ** 2)) if len(y) else float("nan")
    before = calibration.uncalibrated(p) if calibration.active else None
    left, right = st.columns([2, 1])
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="perfect")
    if before is not None:
        old = evaluate.calibration_bins(y, before, n_bins=10)
        fig.add_scatter(x=old["mean_predicted"], y=old["fraction_positive"], mode="lines+markers",
                        line=dict(dash="dash", color="#9e9e9e"), text=[f"{c} images" for c in old["count"]],
                        name="before calibration")
    fig.add_scatter(x=bins["mean_predicted"], y=bins["fraction_positive"], mode="lines+markers",
                    marker=dict(size=[6 + 14 * np.sqrt(c / max(bins["count"])) for c in bins["count"]]),
                    text=[f"{c} images" for c in bins["count"]], name="this model")
    fig.update_xaxes(title="mean predicted probability", range=[0, 1])
    fig.update_yaxes(title="fraction that really is pneumonia", range=[0, 1.02])
    left.plotly_chart(charts.style(fig, 320), key="calibration")
    ece = expected_calibration_error(y, p)
    right.metric("Expected calibration error", charts.fmt_num(ece),
                 delta=(f"{ece - expected_calibration_error(y, before):+.3f} by {calibration.method} scaling"
                        if before is not None else None), delta_color="inverse",
                 help="The average gap between a predicted probability and how often such images really are "
                      "pneumonia (10 bins, weighted by their images): 0 is perfect.")
    right.metric("Brier score", f"{brier:.3f}", help="Mean squared error of the probabilities: 0 is perfect, "
                 "0.25 is what always answering 50 % scores.")
    right.markdown("Points **below** the diagonal: the model is over-confident about pneumonia; "
                   "**above**: under-confident. Marker size shows how many images a bin holds.")
    if before is not None:
        right.caption(f"The run's probabilities were {calibration.method}-scaled on its validation images after "
                      "training; the grey line is what the network said before. Scaling never changes which "
                      "images are called pneumonia at the run's threshold.")
    elif chosen.external:
        right.caption("This run has no calibration (it was trained before calibration existed): "
                      "`python -m cxr_core calibrate --run RUN` adds one.")


def run_calibration(summary) -> Calibration:
    """The run's calibration; none when it cannot be read (loading the run says why, once)."""
    try:
        return RunFolder(summary.path).read_calibration()
    except CxrError:
        return IDENTITY


SUBGROUP_TITLES = {"subtype": "kind of pneumonia"}


def subgroups(chosen: TestSet) -> None:
    """Figures per pneumonia kind and per group the data set records: where a good headline hides a failure."""
    found = chosen.figures.get("subgroups") or {}
    if not found:
        return
    with st.expander("By kind of pneumonia and by group", expanded=False):
        st.markdown("A good overall AUC can hide a group where the model fails: the viral pneumonias it misses, or "
                    "the copies of the data made one way where a shortcut stops working. Groups of a few images "
                    "say little; a dash means the figure has no meaning there (one class only).")
        for column, groups in found.items():
            rows = {str(value): {"images": figures.get("n"), "pneumonia": figures.get("n_positive"),
                                 "ROC AUC": charts.fmt_num(figures.get("roc_auc")),
                                 "sensitivity": charts.fmt_num(figures.get("sensitivity")),
                                 **({} if column == "subtype" else
                                    {"specificity": charts.fmt_num(figures.get("specificity")),
                                     "accuracy": charts.fmt_num(figures.get("accuracy"))})}
                    for value, figures in groups.items()}
            st.markdown(f"**By {SUBGROUP_TITLES.get(column, column)}**"
                        + (" (each kind against every normal film)" if column == "subtype" else ""))
            charts.table(pd.DataFrame(rows).T, width="stretch")


def gallery(summary, preds: pd.DataFrame, threshold: float, test_set: str) -> None:
    st.subheader(f"Misclassified images ({test_set})")
    st.markdown("What does the model look at when it fails? On an external test set these mistakes show "
                "what does not carry over from the training data: a normal film from another scanner or "
                "copy of the data called pneumonia is the typical sign of a shortcut.")
    called = preds["probability"].map(lambda p: label_for(p, threshold))
    wrong = preds[called != preds["y"].astype(int).map(CLASSES.__getitem__)].copy()
    if wrong.empty:
        st.success("Every test image is classified correctly at this threshold.")
        return
    wrong["confidence"] = (wrong["probability"] - threshold).abs()
    wrong = wrong.sort_values("confidence", ascending=False)
    kinds = {"false positives (normal called pneumonia)": 0, "false negatives (missed pneumonia)": 1}
    kind = st.radio("Show", list(kinds), horizontal=True, key="eval_gallery_kind")
    chosen = wrong[wrong["y"].astype(int) == kinds[kind]]
    st.caption(f"{len(wrong)} images are misclassified at {threshold:.2f}; the most confident mistakes "
               f"come first. Grad-CAM shows where the model looked.")
    if chosen.empty:
        st.info("None of this kind.")
        return
    if not st.toggle(f"Compute Grad-CAM for the {min(MAX_GALLERY, len(chosen))} most confident", key="eval_gradcam"):
        shown = chosen[["path", "probability"]].head(50)
        charts.table(shown.assign(path=shown["path"].map(lambda s: Path(s).name)), hide_index=True,
                     column_config={"path": st.column_config.TextColumn("image", width="large"),
                                    "probability": st.column_config.NumberColumn(format="%.3f")})
        return
    # Each map shows the evidence for the wrong call: PNEUMONIA for a false positive, NORMAL for a miss.
    target = CLASSES[1 - kinds[kind]]
    models.map_gallery(summary, chosen, target, MAX_GALLERY,
                       lambda row, found: f"p = {found.probability:.2f} (truly {CLASSES[int(row['y'])]})",
                       map_caption(target))


def compare(summary, others: list) -> None:
    st.subheader("Compare two runs")
    candidates = [s for s in others if str(s.path) != str(summary.path)]
    if not candidates:
        st.caption("Train a second run to compare it with this one side by side.")
        return
    by_path = {str(s.path): s for s in candidates}
    other = by_path[st.selectbox("Compare with", list(by_path), format_func=lambda k: models.run_label(by_path[k]),
                                 key="eval_compare")]
    # Short column labels (run names are long and would be cut); the full names are in the tooltips.
    runs_shown = {"this run": summary, "compared": other}
    tasks = {label: models.task_of(s.path) for label, s in runs_shown.items()}
    # A run of more than two classes is compared on pneumonia against normal, the question both tasks answer.
    with_subtype = not all(task.is_binary for task in tasks.values())
    table, subtype_rows = {}, {}
    fig = go.Figure()
    for label, s in runs_shown.items():
        metrics = RunFolder(s.path).metrics()
        at = metrics.test_at_threshold if metrics is not None else {}
        table[label] = (at if tasks[label].is_binary else at.get("pneumonia_vs_normal")) or None
        subtype_rows[label] = {} if tasks[label].is_binary else at
        preds = test_predictions(s.path)
        y = (preds["y"].astype(int) > 0).astype(int)  # any pneumonia (a subtype run's 1 and 2 too)
        if len(preds) and y.nunique() == 2:
            roc = evaluate.roc_points(y.to_numpy(), preds["probability"].to_numpy())
            fig.add_scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name=label)
    headers = {"_index": st.column_config.TextColumn(width="medium"),
               **{label: st.column_config.TextColumn(label, help=f"Run {s.run_id}") for label, s in runs_shown.items()}}
    left, right = st.columns([1, 1])
    figures = charts.metrics_table(table)
    if with_subtype:
        extra = {"3-class accuracy": "accuracy", "Macro AUC (3 classes)": "roc_auc"}
        for row, name in extra.items():
            figures.loc[row] = [charts.fmt_num(subtype_rows[label].get(name)) for label in runs_shown]
        figures.loc["Bacterial vs viral accuracy"] = [
            charts.fmt_num((subtype_rows[label].get("bacterial_vs_viral") or {}).get("accuracy"))
            for label in runs_shown]
        left.caption("A three-class run is compared on pneumonia against normal (P(PNEUMONIA) = 1 − P(NORMAL), at "
                     "0.5), the question both tasks answer; its three-class figures follow.")
    charts.table(figures, where=left, width="stretch", column_config=headers)
    configs = pd.DataFrame({label: _config_summary(s) for label, s in runs_shown.items()})
    if with_subtype:
        configs.loc["task"] = [f"{len(t.classes)} classes" for t in tasks.values()]
    charts.table(configs, where=left, width="stretch", column_config=headers)
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="chance")
    fig.update_xaxes(title="1 − specificity")
    fig.update_yaxes(title="sensitivity")
    charts.unit_axes(fig, x=True, y=True)
    roc_title = ("ROC curves on each run's own test set" if not with_subtype
                 else "ROC of pneumonia vs normal, own test sets")
    right.plotly_chart(charts.style(fig, 360, title=roc_title), key="compare_roc")
    st.caption(f"This run: {summary.run_id}; compared: {other.run_id}. Runs tested on different data sets or "
               "splits are not directly comparable: an official Kermany test set is harder than a random split.")
    shared = [found for found in paired.shared_evaluations(summary.path, other.path)
              if not datasets.hidden_evaluation(found["name"])]
    for found in shared:
        (st.success if found.get("different") else st.info)(paired.verdict(found), icon=":material/balance:")
    if not shared:
        st.caption("Evaluate both runs on the same external data set (below) to learn whether their difference is "
                   "beyond chance: they are then compared image by image (DeLong's test for the AUCs).")


CONFIG_ROWS = ["backbone", "weights", "image size", "data", "split", "epochs", "balance", "fine-tune"]


def _config_summary(summary) -> dict:
    """The settings that tell two runs apart, as text (None, shown as a dash, when unknown)."""
    config = RunFolder(summary.path).config_or_none()
    if config is None:
        return dict.fromkeys(CONFIG_ROWS)
    model, data, train = config.model, config.data, config.train
    layers = "all" if train.fine_tune_layers == -1 else f"top {train.fine_tune_layers}"
    return {"backbone": model.backbone or None, "weights": Path(str(model.weights)).name or None,
            "image size": f"{model.resolved_image_size} px", "data": Path(str(data.data_dir)).name or None,
            "split": data.split or None, "epochs": str(train.epochs), "balance": train.balance or None,
            "fine-tune": (f"{layers} layers × {train.fine_tune_epochs} epochs"
                          if train.fine_tune_layers and train.fine_tune_epochs else "none")}


def other_folder(summary) -> None:
    st.subheader("Evaluate on another data set")
    how = ("calling each image its most probable class (its subtype comes from the file name)"
           if not models.task_of(summary.path).uses_threshold else "at the run's threshold")
    st.markdown("A model that does well on its own test set can fail on images from another hospital or "
                f"machine (a *domain shift*). Run it on any data set under the data root, {how}; the result "
                "is kept with the run and shown first, as its honest score.")
    names = datasets.list_datasets()
    if not names:
        st.caption("No data sets under the data root yet; add one on the Dataset page.")
        return
    if st.session_state.get("eval_other_dataset") not in names:  # a value this session may not choose
        st.session_state.pop("eval_other_dataset", None)
    name = st.selectbox("Data set", names, key="eval_other_dataset")
    limit = st.number_input("At most this many images (0 = all)", 0, 100_000, 0, 100, key="eval_other_limit",
                            help="A stratified sample keeps it quick on a laptop; all images give the real figure.")
    # A visitor uses the operator's shared runs without changing them: the result is shown, not kept.
    keep = access.can_delete(summary)
    if not keep:
        st.caption("This run is shared, so your result is shown here and not kept with the run.")
    if not st.button("Evaluate on this data set", icon=":material/play_arrow:"):
        return
    if datasets.hides(name):  # the one rule again, at the moment of use
        st.error(classroom.LOCKED_SENTENCE, icon=":material/lock:")
        return
    bar = st.progress(0.0, text="Classifying...")

    def progress(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"Classified {done} of {total}")

    try:
        result = external.evaluate_folder(summary.path, datasets.data_root() / name,
                                          predictor=models.load_predictor(summary.path), on_progress=progress,
                                          limit=int(limit) or None, store=keep)
    except CxrError as error:
        bar.empty()
        st.error(str(error))
        return
    bar.empty()
    if result.get("warning"):
        st.warning(result["warning"], icon=":material/warning:")
    if result.get("skipped"):
        st.warning(f"{len(result['skipped'])} image(s) could not be read and were left out.")
    kept = "It is now a test set above." if keep else "It was not kept (a shared run)."
    if not get_task(result.get("task") or "pneumonia").uses_threshold:
        st.success(f"Evaluated {result['n']} images of {name}: macro AUC {charts.fmt_num(result.get('roc_auc'))}, "
                   f"accuracy {charts.fmt_num(result.get('accuracy'))} (most probable class). {kept}")
    else:
        st.success(f"Evaluated {result['n']} images of {name}: AUC {charts.fmt_num(result['roc_auc'])}, accuracy "
                   f"{charts.fmt_num(result['accuracy'])} at the run's threshold. {kept}")
    if keep:
        st.session_state[KEY_SHOW_NEWEST] = True  # show the newest test set, which is this one
        st.rerun()


KEY_TEST_SET = "eval_test_set"
KEY_THRESHOLD_FOR = "eval_threshold_for"  # the slider key (run and test set) the threshold state belongs to
KEY_SHOW_NEWEST = "eval_show_newest"


def marker_note(chosen: TestSet) -> None:
    """A shortcut-lab test set: how often the model's pneumonia map peaks on the planted marker."""
    result = chosen.figures
    if result.get("marker_attention") is None:
        return
    st.metric("Grad-CAM peak on the planted marker", f"{result['marker_attention']:.0%}",
              help="The peak of the map of the evidence for pneumonia, within one map cell of the marker's box.")
    st.caption(f"Of the {result.get('n_marked', '?')} images here that carry the shortcut lab's marker, this is the "
               "share whose strongest evidence for pneumonia lies on the marker, not in the lungs: the higher, the "
               "more the model reads the marker.")


def prevalence_note(chosen: TestSet) -> None:
    shift = chosen.prevalence
    if shift is None:
        return
    with st.expander("Does a new site's prevalence explain the errors?"):
        st.markdown(
            f"The run chose its threshold where {shift.validation_prevalence:.0%} of images were pneumonia. "
            f"From its probabilities alone (no labels), this set looks like {shift.estimated_prevalence:.0%} "
            f"pneumonia (truly {shift.true_prevalence:.0%}). Moving the threshold to that prevalence "
            f"(Saerens et al. 2002) gives {charts.fmt_num(shift.threshold)}: accuracy "
            f"{charts.fmt_num(shift.figures.get('accuracy'))}, sensitivity "
            f"{charts.fmt_num(shift.figures.get('sensitivity'))}, specificity "
            f"{charts.fmt_num(shift.figures.get('specificity'))}. This only helps when the probabilities "
            "are calibrated on the new images; an over-confident model moves it the wrong way.")


summary = models.run_picker("Run", key="eval_run")
models.warn_if_useless(summary)
if summary is not None and (trained_on := models.where_trained(summary.path)):
    st.caption(trained_on)  # host, devices, strategy and precision, when the run recorded them
if summary is None:
    no_run_message()
else:
    sets = test_sets(summary)
    if not sets:
        st.warning(f"Run {summary.run_id} has no test metrics or predictions (metrics.json / predictions.csv); "
                   "it may have been trained without a test part. Evaluate it on another data set below.")
    else:
        labels = list(sets)
        if st.session_state.pop(KEY_SHOW_NEWEST, False) or st.session_state.get(KEY_TEST_SET) not in labels:
            st.session_state[KEY_TEST_SET] = labels[0]
        choice = st.radio("Test set", labels, key=KEY_TEST_SET, horizontal=True, **session.KEEP,
                          help="External test sets come from outside the run's data; they are the honest score.")
        if len(labels) > 1 or not sets[choice].external:
            st.caption(
                "An external test set (another collection, hospital or copy of the data) is the honest score. "
                "The run's own test part shares patients' hospital, scanners and image preparation with "
                "training, so it flatters the model: the official Kermany test set is harder than any "
                "split of the training images.")
        chosen = sets[choice]
        preds = chosen.predictions
        if not models.task_of(summary.path).uses_threshold:  # the most probable class, no threshold
            multiclass.subtype_evaluation(summary, chosen, choice.split(":")[0], MAX_GALLERY)
        else:
            y = preds["y"].astype(int).to_numpy()
            p = preds["probability"].astype(float).to_numpy()
            headline(chosen, summary)
            prevalence_note(chosen)
            marker_note(chosen)
            key = f"eval_threshold_{summary.run_id}_{chosen.name}"
            if len(np.unique(y)) < 2:
                st.warning("The test set holds only one class, so curves and AUC cannot be drawn.")
            else:
                threshold_explorer(y, p, chosen, key=key)
                subgroups(chosen)
                calibration(y, p, chosen, run_calibration(summary))
            gallery(summary, preds, float(st.session_state.get(key, chosen.threshold)), choice.split(":")[0])
        compare(summary, models.finished_runs())
    other_folder(summary)
st.caption(frame.DISCLAIMER)
