"""Evaluation: how good is a finished run, at which threshold, how calibrated, and where it fails."""
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core import evaluate, runs
from cxr_core.errors import CxrError
from cxr_core.predict import overlay_heatmap
from pages import ui

ui.page_header(
    "Evaluation",
    "A model is judged on **test images it never saw during training**. Accuracy alone misleads when "
    "the classes are imbalanced, so look at sensitivity (pneumonias found) and specificity (normal "
    "films left alone), the ROC and precision-recall curves, and whether a predicted 80 % really "
    "means pneumonia four times out of five (calibration).",
)

MAX_GALLERY = 6


def no_run_message() -> None:
    st.info("No finished run yet. Train one on the **Training** page; its test-set results appear here "
            "when it is done.", icon=":material/info:")
    st.page_link("pages/training.py", label="Go to Training", icon=":material/model_training:")


def test_predictions(run_dir: Path) -> pd.DataFrame:
    preds = runs.read_predictions(run_dir)
    if "split" in preds.columns:
        preds = preds[preds["split"] == "test"]
    return preds.dropna(subset=["y", "probability"])


def headline(metrics: dict) -> None:
    test = (metrics.get("test") or {}).get("at_threshold") or {}
    cols = st.columns(5)
    cols[0].metric("Test ROC AUC", ui.fmt_num(test.get("roc_auc")),
                   help="Probability that a random pneumonia image scores higher than a random normal one.")
    cols[1].metric("Sensitivity", ui.fmt_num(test.get("sensitivity")), help="Share of pneumonias called PNEUMONIA.")
    cols[2].metric("Specificity", ui.fmt_num(test.get("specificity")), help="Share of normal films called NORMAL.")
    cols[3].metric("Accuracy", ui.fmt_num(test.get("accuracy")))
    cols[4].metric("Threshold", ui.fmt_num(metrics.get("threshold")),
                   help=f"Chosen on the validation images by the {metrics.get('threshold_rule', '?')} rule.")
    n = test.get("n")
    if n:
        st.caption(f"{n} test images ({test.get('n_positive', '?')} pneumonia, {test.get('n_negative', '?')} normal)"
                   + (f" from {metrics['n_patients_test']} patients" if metrics.get("n_patients_test") else "")
                   + ". Few test images mean wide uncertainty: ±0.05 on a metric is noise below a few hundred.")


@st.fragment
def threshold_explorer(y: np.ndarray, p: np.ndarray, metrics: dict, key: str) -> None:
    """The threshold slider: sensitivity, specificity and the confusion matrix follow it."""
    st.subheader("Choose the threshold")
    st.markdown("Lowering the threshold finds more pneumonias (higher sensitivity) at the price of more "
                "false alarms (lower specificity). A screening tool wants high sensitivity.")
    run_threshold = float(metrics.get("threshold", 0.5))
    threshold = st.slider("Threshold", 0.0, 1.0, round(run_threshold, 3), 0.001, key=key, format="%.3f",
                          help="An image is called PNEUMONIA when its probability is at or above this.")
    live = evaluate.binary_metrics(y, p, threshold)
    left, right = st.columns([1, 1])
    with left:
        a, b = st.columns(2)
        a.metric("Sensitivity", f"{live['sensitivity']:.3f}",
                 delta=f"{live['sensitivity'] - _at(metrics, 'sensitivity'):+.3f} vs run threshold")
        b.metric("Specificity", f"{live['specificity']:.3f}",
                 delta=f"{live['specificity'] - _at(metrics, 'specificity'):+.3f} vs run threshold")
        test = metrics.get("test") or {}
        table = ui.metrics_table({"at 0.5": test.get("at_0.5"), "at run threshold": test.get("at_threshold"),
                                  f"at {threshold:.3f}": live})
        st.dataframe(table, width="stretch")
    with right:
        st.plotly_chart(ui.confusion_figure(live["confusion_matrix"], f"Confusion matrix at {threshold:.2f}"),
                        key=f"{key}_cm")
    curves(y, p, threshold, live, key)


def _at(metrics: dict, name: str) -> float:
    return float((((metrics.get("test") or {}).get("at_threshold") or {}).get(name)) or 0.0)


def curves(y, p, threshold: float, live: dict, key: str) -> None:
    roc = evaluate.roc_points(y, p)
    pr = evaluate.pr_points(y, p)
    left, right = st.columns(2)
    fig = go.Figure()
    fig.add_scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name=f"ROC (AUC {ui.fmt_num(live['roc_auc'])})")
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="chance")
    fig.add_scatter(x=[1 - live["specificity"]], y=[live["sensitivity"]], mode="markers",
                    marker=dict(size=12, color="#d1495b"), name=f"threshold {threshold:.2f}")
    fig.update_xaxes(title="1 − specificity (false-positive rate)", range=[0, 1])
    fig.update_yaxes(title="sensitivity", range=[0, 1.02])
    left.plotly_chart(ui.style(fig, 340, title="ROC curve"), key=f"{key}_roc")
    fig = go.Figure()
    fig.add_scatter(x=pr["recall"], y=pr["precision"], mode="lines", name=f"PR (AP {ui.fmt_num(live['pr_auc'])})")
    base = float(np.mean(y)) if len(y) else 0.0
    fig.add_scatter(x=[0, 1], y=[base, base], mode="lines", line=dict(dash="dot", color="gray"),
                    name=f"prevalence {base:.2f}")
    fig.add_scatter(x=[live["sensitivity"]], y=[live["precision"]], mode="markers",
                    marker=dict(size=12, color="#d1495b"), name=f"threshold {threshold:.2f}")
    fig.update_xaxes(title="recall (sensitivity)", range=[0, 1])
    fig.update_yaxes(title="precision", range=[0, 1.02])
    right.plotly_chart(ui.style(fig, 340, title="Precision-recall curve"), key=f"{key}_pr")


def calibration(y, p) -> None:
    st.subheader("Calibration")
    bins = evaluate.calibration_bins(y, p, n_bins=10)
    brier = float(np.mean((p - y) ** 2)) if len(y) else float("nan")
    left, right = st.columns([2, 1])
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="perfect")
    fig.add_scatter(x=bins["mean_predicted"], y=bins["fraction_positive"], mode="lines+markers",
                    marker=dict(size=[6 + 14 * np.sqrt(c / max(bins["count"])) for c in bins["count"]]),
                    text=[f"{c} images" for c in bins["count"]], name="this model")
    fig.update_xaxes(title="mean predicted probability", range=[0, 1])
    fig.update_yaxes(title="fraction that really is pneumonia", range=[0, 1.02])
    left.plotly_chart(ui.style(fig, 320), key="calibration")
    right.metric("Brier score", f"{brier:.3f}", help="Mean squared error of the probabilities: 0 is perfect, "
                 "0.25 is what always answering 50 % scores.")
    right.markdown("Points **below** the diagonal: the model is over-confident about pneumonia; "
                   "**above**: under-confident. Marker size shows how many images a bin holds.")


def gallery(summary, preds: pd.DataFrame, threshold: float) -> None:
    st.subheader("Misclassified test images")
    wrong = preds[(preds["probability"] >= threshold).astype(int) != preds["y"].astype(int)].copy()
    if wrong.empty:
        st.success("Every test image is classified correctly at this threshold.")
        return
    wrong["confidence"] = (wrong["probability"] - threshold).abs()
    wrong = wrong.sort_values("confidence", ascending=False)
    kinds = {"false positives (normal called pneumonia)": 0, "false negatives (missed pneumonia)": 1}
    kind = st.radio("Show", list(kinds), horizontal=True, key="eval_gallery_kind")
    chosen = wrong[wrong["y"].astype(int) == kinds[kind]]
    st.caption(f"{len(wrong)} test images are misclassified at {threshold:.2f}; the most confident mistakes "
               f"come first. Grad-CAM shows where the model looked.")
    if chosen.empty:
        st.info("None of this kind.")
        return
    if not st.toggle(f"Compute Grad-CAM for the {min(MAX_GALLERY, len(chosen))} most confident", key="eval_gradcam"):
        st.dataframe(chosen[["path", "probability"]].head(50).assign(path=lambda f: f["path"].map(lambda s: Path(s).name)),
                     hide_index=True)
        return
    stamp = ui.model_stamp(summary.path)
    columns = st.columns(3)
    for i, (_, row) in enumerate(chosen.head(MAX_GALLERY).iterrows()):
        with columns[i % 3]:
            try:
                gray, probability, heatmap = ui.explain_path(str(summary.path), stamp, str(row["path"]))
            except CxrError as error:
                st.error(f"{Path(str(row['path'])).name}: {error}")
                continue
            st.image(overlay_heatmap(gray, heatmap, 0.4), width="stretch",
                     caption=f"{Path(str(row['path'])).name}: p = {probability:.2f} "
                             f"(truly {'PNEUMONIA' if int(row['y']) else 'NORMAL'})")


def compare(summary, others: list) -> None:
    st.subheader("Compare two runs")
    candidates = [s for s in others if str(s.path) != str(summary.path)]
    if not candidates:
        st.caption("Train a second run to compare it with this one side by side.")
        return
    by_path = {str(s.path): s for s in candidates}
    other = by_path[st.selectbox("Compare with", list(by_path), format_func=lambda k: ui.run_label(by_path[k]),
                                 key="eval_compare")]
    table = {}
    fig = go.Figure()
    for s in (summary, other):
        metrics = runs.read_metrics(s.path) or {}
        table[s.run_id] = ((metrics.get("test") or {}).get("at_threshold"))
        preds = test_predictions(s.path)
        if len(preds) and preds["y"].nunique() == 2:
            roc = evaluate.roc_points(preds["y"].to_numpy(), preds["probability"].to_numpy())
            fig.add_scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name=s.run_id)
    left, right = st.columns([1, 1])
    left.dataframe(ui.metrics_table(table), width="stretch")
    configs = pd.DataFrame({s.run_id: _config_summary(s) for s in (summary, other)})
    left.dataframe(configs, width="stretch")
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="chance")
    fig.update_xaxes(title="1 − specificity")
    fig.update_yaxes(title="sensitivity")
    right.plotly_chart(ui.style(fig, 360, title="ROC curves on each run's own test set"), key="compare_roc")
    st.caption("Runs tested on different data sets or splits are not directly comparable: an official "
               "Kermany test set is harder than a random split.")


def _config_summary(summary) -> dict:
    c = ui.config_dict(summary)
    model, data, train = c.get("model", {}), c.get("data", {}), c.get("train", {})
    return {"backbone": model.get("backbone"), "weights": Path(str(model.get("weights", ""))).name,
            "image size": model.get("image_size"), "data": Path(str(data.get("data_dir", ""))).name,
            "split": data.get("split"), "epochs": train.get("epochs"), "balance": train.get("balance"),
            "fine-tune": f"{train.get('fine_tune_layers')} layers × {train.get('fine_tune_epochs')}"}


def other_folder(summary, threshold: float) -> None:
    st.subheader("Evaluate on another data set")
    st.markdown("A model that does well on its own test set can fail on images from another hospital or "
                "machine (a *domain shift*). Run it on any data set under the data root, at the run's threshold.")
    names = ui.list_datasets()
    if not names:
        st.caption("No data sets under the data root yet; add one on the Dataset page.")
        return
    name = st.selectbox("Data set", names, key="eval_other_dataset")
    limit = st.number_input("At most this many images (0 = all)", 0, 100_000, 500, 100, key="eval_other_limit",
                            help="A stratified sample keeps it quick on a laptop.")
    if not st.button("Evaluate on this data set", icon=":material/play_arrow:"):
        return
    try:
        result = ui.scan(ui.data_root() / name)
        manifest = result.manifest
        if limit and len(manifest) > limit:
            from cxr_core import data
            manifest = data.stratified_subset(manifest, int(limit), seed=123)
        predictor = ui.load_predictor(summary.path)
        paths = manifest["path"].tolist()
        bar = st.progress(0.0, text="Classifying...")
        outputs = []
        for start in range(0, len(paths), 64):
            outputs.extend(predictor.predict_files(paths[start:start + 64]))
            bar.progress(min(1.0, (start + 64) / len(paths)), text=f"Classified {min(start + 64, len(paths))} of {len(paths)}")
        bar.empty()
    except CxrError as error:
        st.error(str(error))
        return
    probs = {o["file"]: o.get("probability") for o in outputs}
    scored = manifest.assign(probability=manifest["path"].map(probs)).dropna(subset=["probability"])
    failed = len(manifest) - len(scored)
    if scored.empty:
        st.error("None of the images could be read.")
        return
    m = evaluate.binary_metrics(scored["y"].to_numpy(), scored["probability"].to_numpy(), threshold)
    left, right = st.columns(2)
    left.dataframe(ui.metrics_table({f"{name} at {threshold:.2f}": m}), width="stretch")
    right.plotly_chart(ui.confusion_figure(m["confusion_matrix"], f"{name}"), key="other_cm")
    if failed:
        st.warning(f"{failed} image(s) could not be read and were left out.")


summary = ui.run_picker("Run", key="eval_run")
if summary is None:
    no_run_message()
else:
    metrics = runs.read_metrics(summary.path)
    preds = test_predictions(summary.path)
    if not metrics or preds.empty:
        st.warning(f"Run {summary.run_id} has no test metrics or predictions (metrics.json / predictions.csv); "
                   "it may have been trained without a test part.")
    else:
        y = preds["y"].astype(int).to_numpy()
        p = preds["probability"].astype(float).to_numpy()
        headline(metrics)
        if len(np.unique(y)) < 2:
            st.warning("The test set holds only one class, so curves and AUC cannot be drawn.")
        else:
            threshold_explorer(y, p, metrics, key="eval_threshold")
            calibration(y, p)
        gallery(summary, preds, float(st.session_state.get("eval_threshold", metrics.get("threshold", 0.5))))
        compare(summary, ui.finished_runs())
        other_folder(summary, float(metrics.get("threshold", 0.5)))
st.caption(ui.DISCLAIMER)
