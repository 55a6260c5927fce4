"""The Evaluation page's sections for a three-class run (NORMAL, BACTERIA, VIRUS): the most probable
class is the answer, so there is no threshold; figures per class, the confusion between pairs, the
paper's two binary views, curves and calibration per class, and the misclassified images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.core import metrics as evaluate
from cxr_core.inference.predictor import map_caption
from cxr_core.runs.run_folder import TestSet
from pages.ui import charts, models

#: Kermany et al. (2018), Cell 172(5), on their test set: the figures this workbench aims at.
PAPER = {"pneumonia_vs_normal": {"accuracy": 0.928, "sensitivity": 0.932, "specificity": 0.901, "roc_auc": 0.968,
                                 "n": 624},
         "bacterial_vs_viral": {"accuracy": 0.907, "sensitivity": 0.886, "specificity": 0.909, "n": 390}}
COMPARE_ROWS = [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
                ("roc_auc", "ROC AUC"), ("n", "Images")]


def subtype_headline(chosen: TestSet, summary) -> None:
    test = chosen.figures
    kind = "External" if chosen.external else "Internal"
    cols = st.columns(4)
    cols[0].metric(f"{kind} macro AUC", charts.fmt_num(test.get("roc_auc")),
                   help="Each class's one-vs-rest ROC AUC, averaged over the three classes.")
    cols[1].metric("Accuracy", charts.fmt_num(test.get("accuracy")),
                   help="Share of images whose most probable class is the true one.")
    cols[2].metric("Bacterial vs viral accuracy",
                   charts.fmt_num((test.get("bacterial_vs_viral") or {}).get("accuracy")),
                   help="Among the images that truly are bacterial or viral pneumonia.")
    cols[3].metric("Pneumonia vs normal AUC", charts.fmt_num((test.get("pneumonia_vs_normal") or {}).get("roc_auc")),
                   help="P(pneumonia) = P(BACTERIA) + P(VIRUS) = 1 − P(NORMAL), ranked against the normal films.")
    per_class = test.get("per_class") or {}
    counts = ", ".join(f"{(per_class.get(c) or {}).get('n', '?')} {c}" for c in (test.get("classes") or per_class))
    st.caption(f"{models.test_set_caption(chosen, summary)} {counts}. Each image is called its most probable class: "
               "a three-class run has no threshold to choose, so there is no threshold slider.")
    few_test_images(test)


def found_intervals(test: dict) -> dict[str, tuple[float, float, int]]:
    """The 95 % interval of the share of each class's images called that class, with the class's image count.
    The two-class page's sensitivity and specificity are exactly these shares for PNEUMONIA and NORMAL."""
    classes = list(test.get("classes") or [])
    cm = test.get("confusion_matrix")
    per_class = test.get("per_class") or {}
    found = {}
    for c, name in enumerate(classes):
        if cm:
            hits, n = int(cm[c][c]), int(sum(cm[c]))
        else:  # no matrix stored: the class's sensitivity and count give the same two numbers
            figures = per_class.get(name) or {}
            n = int(figures.get("n") or 0)
            hits = round(float(figures.get("sensitivity") or 0.0) * n)
        interval = evaluate.proportion_interval(hits, n)
        if interval is not None:
            found[name] = (*interval, n)
    return found


def few_test_images(test: dict) -> None:
    """The two-class page's rule, class by class: warn when the share of any class found is known only to within
    more than ±WIDE_INTERVAL (a class with few test images), so that close runs cannot be told apart."""
    found = found_intervals(test)
    if not evaluate.intervals_are_wide({name: (low, high) for name, (low, high, _n) in found.items()}):
        return
    name, (low, high, n) = max(found.items(), key=lambda item: item[1][1] - item[1][0])
    st.warning(f"Few test images: the share of {name} images called {name} ({n} images) is known only to within "
               f"±{(high - low) / 2:.2f} (95 % interval, wider than ±{evaluate.WIDE_INTERVAL:.2f}), so runs that "
               "differ by less cannot be told apart on this test set.", icon=":material/warning:")


def confused_pairs(cm: list[list[int]], classes: list[str], top: int = 3) -> list[str]:
    """The most frequent mistakes as sentences, largest first: '12 of 40 VIRUS images (30 %) were called BACTERIA.'"""
    z = np.asarray(cm, dtype=int)
    pairs = sorted(((int(z[t, q]), t, q) for t in range(len(classes)) for q in range(len(classes))
                    if t != q and z[t, q] > 0), reverse=True)
    return [f"{n} of {int(z[t].sum())} {classes[t]} images ({n / max(int(z[t].sum()), 1):.0%}) were called "
            f"{classes[q]}." for n, t, q in pairs[:top]]


def subtype_confusion(test: dict, key: str) -> None:
    st.subheader("Which classes are confused")
    classes = list(test.get("classes") or [])
    cm = test.get("confusion_matrix")
    left, right = st.columns([1, 1])
    with left:
        charts.table(charts.per_class_table(test), width="stretch")
        st.caption("Each class against the other two: AUC ranks that class's probability (one vs rest), "
                   "sensitivity is the share of the class found, specificity the share of the other images not "
                   "called it, precision the share of its calls that are right.")
    if cm and classes:
        right.plotly_chart(charts.confusion_figure(cm, "Confusion matrix (most probable class)", tuple(classes)),
                           key=f"{key}_cm")
        sentences = confused_pairs(cm, classes)
        if sentences:
            st.markdown("**The most frequent mistakes:** " + " ".join(sentences))
            if "NORMAL" not in sentences[0]:
                st.caption("Mistakes between BACTERIA and VIRUS are the expected ones: on a film the two patterns "
                           "overlap (lobar consolidation is typical of bacteria, diffuse patchy opacities of viruses, "
                           "but many films show neither clearly), and the viral class is the smaller one.")
            elif "NORMAL images" in sentences[0] and "VIRUS" in sentences[0]:
                st.caption("Normal films called viral are the usual first mistake: the mild, diffuse opacities of a "
                           "viral pneumonia are the pattern nearest a normal film. Compare the pneumonia-vs-normal "
                           "figures below with a two-class run.")
            else:
                st.caption("The largest mistake involves NORMAL films, which a two-class model tells from "
                           "pneumonia well: compare the pneumonia-vs-normal figures below with a two-class run.")
        else:
            st.success("No test image is confused with another class.")


def paper_comparison(test: dict) -> None:
    st.subheader("The two questions a clinician asks, next to Kermany et al. (2018)")
    st.markdown("The same probabilities answer the binary question (any pneumonia: P(BACTERIA) + P(VIRUS) ≥ 0.5, "
                "so this run can be compared with a two-class one on the same test set) and the question that "
                "decides antibiotics: among the pneumonias, bacterial or viral (the larger of the two "
                "probabilities; viral is the positive class, as in the paper).")
    columns = {"pneumonia vs normal": test.get("pneumonia_vs_normal") or {},
               "paper (pneumonia vs normal)": PAPER["pneumonia_vs_normal"],
               "bacterial vs viral": test.get("bacterial_vs_viral") or {},
               "paper (bacterial vs viral)": PAPER["bacterial_vs_viral"]}
    table = pd.DataFrame({name: [charts.fmt_num(values.get(k), 0 if k == "n" else 3) for k, _ in COMPARE_ROWS]
                          for name, values in columns.items()}, index=[label for _, label in COMPARE_ROWS])
    charts.table(table, width="stretch")
    st.caption("The paper's figures are on the release's official test set (624 images, 390 of them pneumonia) "
               "with InceptionV3; a run's internal test part is easier than that, so compare on the official test "
               "set (Evaluate on another data set, below).")


def _class_probabilities(preds: pd.DataFrame, classes: list[str]) -> np.ndarray | None:
    """The per-class probability columns (p_NORMAL, p_BACTERIA, p_VIRUS), or None when they were not stored."""
    columns = [f"p_{c}" for c in classes]
    if not classes or not set(columns) <= set(preds.columns):
        return None
    return preds[columns].astype(float).to_numpy()


def subtype_roc(preds: pd.DataFrame, test: dict, classes: list[str]) -> go.Figure | None:
    """ROC curves of each class against the other two (None when the per-class probabilities were not stored)."""
    probs = _class_probabilities(preds, classes)
    if probs is None:
        return
    y = preds["y"].astype(int).to_numpy()
    fig = go.Figure()
    for c, name in enumerate(classes):
        truth = (y == c).astype(int)
        if 0 < truth.sum() < len(truth):
            roc = evaluate.roc_points(truth, probs[:, c])
            auc = charts.fmt_num(((test.get("per_class") or {}).get(name) or {}).get("roc_auc"))
            fig.add_scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name=f"{name} (AUC {auc})",
                            line=dict(color=charts.CLASS_COLORS.get(name)))
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="chance")
    fig.update_xaxes(title="1 − specificity (false-positive rate)")
    fig.update_yaxes(title="sensitivity")
    charts.unit_axes(fig, x=True, y=True)
    return fig


def subtype_calibration(preds: pd.DataFrame, test: dict, classes: list[str], column, key: str) -> None:
    bins_by_class = test.get("calibration") or {}
    probs = _class_probabilities(preds, classes)
    if not bins_by_class and probs is not None:
        y = preds["y"].astype(int).to_numpy()
        bins_by_class = {name: evaluate.calibration_bins((y == c).astype(int), probs[:, c])
                         for c, name in enumerate(classes)}
    if not bins_by_class:
        return
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="perfect")
    for name, bins in bins_by_class.items():
        counts = bins.get("count") or [1]
        fig.add_scatter(x=bins["mean_predicted"], y=bins["fraction_positive"], mode="lines+markers",
                        marker=dict(size=[6 + 14 * np.sqrt(c / max(counts)) for c in counts]),
                        line=dict(color=charts.CLASS_COLORS.get(name)),
                        text=[f"{c} images" for c in counts], name=name)
    fig.update_xaxes(title="mean predicted probability of the class")
    fig.update_yaxes(title="fraction that really is the class")
    charts.unit_axes(fig, x=True, y=True)
    column.plotly_chart(charts.style(fig, 340, title="Calibration, one class against the rest"), key=f"{key}_cal")


def subtype_curves(preds: pd.DataFrame, test: dict, key: str) -> None:
    st.subheader("Curves and calibration per class")
    classes = list(test.get("classes") or [])
    left, right = st.columns(2)
    fig = subtype_roc(preds, test, classes)
    if fig is not None:
        left.plotly_chart(charts.style(fig, 340, title="ROC curves, one class against the rest"), key=f"{key}_roc")
    subtype_calibration(preds, test, classes, right if fig is not None else left, key)
    st.caption("Calibration: points below the diagonal mean the model is over-confident about that class, above "
               "it under-confident. Marker size shows how many images a bin holds.")


def subtype_gallery(summary, preds: pd.DataFrame, classes: list[str], test_set: str, limit: int = 6) -> None:
    st.subheader(f"Misclassified images ({test_set})")
    probs = _class_probabilities(preds, classes)
    if probs is None:
        st.caption("This test set's stored predictions hold no probability per class, so its mistakes cannot be "
                   "listed here.")
        return
    truth = preds["y"].astype(int).to_numpy()
    called = probs.argmax(axis=1)
    wrong = preds.assign(true=[classes[t] for t in truth], called=[classes[c] for c in called],
                         confidence=probs.max(axis=1))[truth != called]
    if wrong.empty:
        st.success("Every test image is called its true class.")
        return
    st.markdown("What does the model look at when it picks the wrong class? The map shows the evidence for the "
                "class it wrongly chose.")
    kinds = wrong.groupby(["true", "called"]).size().sort_values(ascending=False)
    options = [f"{t} called {c}" for t, c in kinds.index]
    kind = st.radio("Show", options, horizontal=True, key="eval_gallery_pair",
                    format_func=lambda o: f"{o} ({int(kinds[tuple(o.split(' called '))])})")
    true_class, called_class = kind.split(" called ")
    chosen = wrong[(wrong["true"] == true_class) & (wrong["called"] == called_class)].sort_values(
        "confidence", ascending=False)
    st.caption(f"{len(wrong)} images are called the wrong class; the most confident mistakes come first.")
    if not st.toggle(f"Compute Grad-CAM for the {min(limit, len(chosen))} most confident", key="eval_gradcam"):
        shown = chosen[["path", *[f"p_{c}" for c in classes]]].head(50)
        charts.table(shown.assign(path=shown["path"].map(lambda s: Path(s).name)), hide_index=True,
                     column_config={"path": st.column_config.TextColumn("image", width="large"),
                                    **{f"p_{c}": st.column_config.NumberColumn(f"P({c})", format="%.3f")
                                       for c in classes}})
        return
    models.map_gallery(summary, chosen, called_class, limit,
                       lambda row, _found: f"P({called_class}) = {row[f'p_{called_class}']:.2f} (truly {true_class})",
                       map_caption(called_class, task="subtype"))


def subtype_evaluation(summary, chosen: TestSet, test_set: str, limit: int = 6) -> None:
    """The Evaluation page of a run that tells NORMAL, BACTERIA and VIRUS apart."""
    test = dict(chosen.figures)
    key = f"eval_subtype_{summary.run_id}_{chosen.name}"
    subtype_headline(chosen, summary)
    subtype_confusion(test, key)
    paper_comparison(test)
    subtype_curves(chosen.predictions, test, key)
    subtype_gallery(summary, chosen.predictions, list(test.get("classes") or []), test_set, limit)
