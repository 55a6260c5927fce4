"""Helpers shared by the pages, one module per kind of thing they hold.

    session   session-state keys (defined once) and the choices read from them
    frame     routing (the page list), the page header and the shared sidebar
    datasets  the data root, cached scans, splits, statistics and thumbnails
    models    run lists and pickers, the cached predictor and the Grad-CAM caches
    charts    plotly helpers, metric tables and number formatting

Pages import the module they need (``from pages.ui import charts``). These modules import
streamlit, plotly, pandas, numpy and cxr_core only; TensorFlow stays inside cxr_core, which
imports it lazily. They live in a subpackage so that Streamlit never lists them as pages (it
looks only at the files directly inside pages/).
"""
from pathlib import Path

#: The folder holding Home.py.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
