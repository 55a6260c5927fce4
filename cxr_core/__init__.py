"""cxr_core: the chest X-ray workbench's library, in subpackages by role (docs/ARCHITECTURE.md).

    core        facts and settings: labels and tasks, backbones, config, recipes, errors, pure metrics
    io          files: atomic writes, hashes, image decoding, starting weights
    data        data sets: scan and split, statistics, augmentation and balance, shortcuts, practice set, download
    runs        the run folder and its records, the registry of runs, heartbeats
    engine      the only place that imports TensorFlow/Keras: model, features, distribution, training, LiteRT export
    inference   the Predictor
    evaluation  external test sets and ensembles of runs
    hosting     a served app: roles, audit, workspaces, the training queue and its jobs, server resources
    teaching    lessons and their checks

The public API is re-exported here lazily (PEP 562), so ``import cxr_core`` stays free of TensorFlow.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "train": ("cxr_core.engine.train", "train"),
    "Predictor": ("cxr_core.inference.predictor", "Predictor"),
    "scan_dataset": ("cxr_core.data.scan", "scan_dataset"),
    "make_split": ("cxr_core.data.scan", "make_split"),
    "RunConfig": ("cxr_core.core.config", "RunConfig"),
    "RunFolder": ("cxr_core.runs.run_folder", "RunFolder"),
    "evaluate_folder": ("cxr_core.evaluation.external", "evaluate_folder"),
    "make_ensemble": ("cxr_core.evaluation.ensemble", "make_ensemble"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'cxr_core' has no attribute {name!r}")
