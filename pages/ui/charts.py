"""Charts and formatting: the common plotly layout, the confusion matrix, metric tables, fmt_*."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.labels import CLASSES

CLASS_COLORS = {"NORMAL": "#2e9e6a", "PNEUMONIA": "#d1495b"}
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


def confusion_figure(cm: list[list[int]], title: str = "Confusion matrix") -> go.Figure:
    """A 2x2 heatmap with counts; rows are the truth, columns the prediction."""
    z = np.asarray(cm, dtype=float)
    total = z.sum() or 1.0
    text = [[f"{int(v)}<br>({v / total:.0%})" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"predicted {c}" for c in CLASSES], y=[f"true {c}" for c in CLASSES],
        text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
    ))
    fig.update_yaxes(autorange="reversed")
    return style(fig, height=300, title=title)


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
