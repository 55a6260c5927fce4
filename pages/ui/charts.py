"""Charts and formatting: the common plotly layout, the confusion matrix, metric tables, fmt_*."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.core.labels import CLASSES

CLASS_COLORS = {"NORMAL": "#2e9e6a", "PNEUMONIA": "#d1495b", "BACTERIA": "#d1495b", "VIRUS": "#e08a1e"}
MISSING = "—"  # how every table and figure shows a value that does not exist
# Axes of rates, probabilities and AUCs: always the whole 0..1 (a flat curve must not zoom to
# -0.5..1.5); a little headroom above 1 keeps a marker at 1.0 whole.
UNIT_RANGE = [0.0, 1.02]


def fmt_seconds(seconds: float | None) -> str:
    """'about 3 min' style durations."""
    if seconds is None or not np.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return MISSING
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.{digits}f}" if np.isfinite(value) else MISSING


def table(data: Any, where: Any = None, **kwargs: Any) -> Any:
    """``st.dataframe`` (in ``where``, a column or container, else the page) with missing values
    shown as a dash, as everywhere else, rather than "None"."""
    return (where or st).dataframe(data, placeholder=MISSING, **kwargs)


def unit_axes(fig: go.Figure, x: bool = False, y: bool = True) -> go.Figure:
    """Fix the axes that show a rate, a probability or an AUC to 0..1."""
    if x:
        fig.update_xaxes(range=[0.0, 1.0])
    if y:
        fig.update_yaxes(range=UNIT_RANGE)
    return fig


def style(fig: go.Figure, height: int = 320, title: str | None = None, **layout: Any) -> go.Figure:
    """A compact common layout: the title at the top left, the legend on its own line above the plot."""
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=78 if title else 36, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0.0,
                                  font=dict(size=11)),
                      **layout)
    if title:
        fig.update_layout(title=dict(text=title, x=0.0, xanchor="left", xref="paper", yref="container",
                                     y=0.985, yanchor="top", font=dict(size=15)))
    return fig


def confusion_figure(cm: list[list[int]], title: str = "Confusion matrix",
                     classes: tuple[str, ...] = CLASSES) -> go.Figure:
    """A square heatmap with counts (2x2, or 3x3 for the subtypes); rows are the truth, columns the
    prediction. Each cell also gives its share of the true class (a row), which is what a small
    class's errors need: 30 of 1,300 is nothing overall but a lot of 150 viral films."""
    z = np.asarray(cm, dtype=float)
    total = z.sum() or 1.0
    if len(classes) == 2:
        text = [[f"{int(v)}<br>({v / total:.0%})" for v in row] for row in z]
    else:
        rows = z.sum(axis=1, keepdims=True)
        share = np.divide(z, rows, out=np.zeros_like(z), where=rows > 0)
        text = [[f"{int(v)}<br>({s:.0%} of true)" for v, s in zip(row, srow)] for row, srow in zip(z, share)]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"predicted {c}" for c in classes], y=[f"true {c}" for c in classes],
        text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
    ))
    fig.update_yaxes(autorange="reversed")
    return style(fig, height=300 if len(classes) == 2 else 360, title=title)


def metrics_table(columns: dict[str, dict | None]) -> pd.DataFrame:
    """Rows are metrics, columns are the given metric dicts (e.g. at 0.5 / at threshold)."""
    names = [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity (recall)"),
             ("specificity", "Specificity"), ("precision", "Precision (PPV)"), ("f1", "F1"),
             ("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC"), ("brier", "Brier score"),
             ("threshold", "Threshold"), ("n", "Images")]
    rows = {}
    for key, label in names:
        digits = 0 if key == "n" else 3
        rows[label] = {col: fmt_num(None if m is None else m.get(key), digits) for col, m in columns.items()}
    return pd.DataFrame(rows).T


def per_class_table(metrics: dict) -> pd.DataFrame:
    """One row per class of a subtype run's metrics (``per_class``): one-vs-rest AUC and rates."""
    names = [("roc_auc", "AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
             ("precision", "Precision"), ("n", "Images")]
    per_class = metrics.get("per_class") or {}
    classes = metrics.get("classes") or list(per_class)
    return pd.DataFrame({label: [fmt_num((per_class.get(c) or {}).get(key), 0 if key == "n" else 3) for c in classes]
                         for key, label in names}, index=list(classes))
