"""Shared fixtures: tiny data sets made in code, and the optional ../shared folder."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_core.core.config import ModelConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"

# The smallest model the tests build and load: MobileNetV2 at width 0.35, random weights, 32 px.
TINY_MODEL = ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none", image_size=32)
# The same network starting from a weights file (written once by the `tiny_weights_file` fixture):
# training refuses a frozen backbone with random weights (it cannot learn), so runs that train only
# the head start from this file, as a real run starts from ImageNet weights.
TINY_WEIGHTS = (Path(tempfile.gettempdir()) / "cxr-workbench-tests"
                / f"tiny-mobilenet_v2_0.35_32-keras{importlib.metadata.version('keras')}.weights.h5")
TINY_PRETRAINED = dataclasses.replace(TINY_MODEL, weights=str(TINY_WEIGHTS))


@pytest.fixture(scope="session", autouse=True)
def tiny_weights_file() -> Path:
    """Write ``TINY_WEIGHTS`` (a seeded random initialisation) unless an earlier session did."""
    if not TINY_WEIGHTS.is_file():
        from cxr_core.engine.model import build_backbone
        from cxr_core.io.atomic import atomic_path

        with atomic_path(TINY_WEIGHTS, suffix=".weights.h5") as tmp:
            build_backbone(TINY_MODEL, seed=1).save_weights(str(tmp))
    return TINY_WEIGHTS


def _xray_like(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    """A crude chest-X-ray-like image: two dark lung fields; pneumonia adds bright opacities."""
    img = np.full((size, size), 170, np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] = 60
    if pneumonia:
        for _ in range(3):
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.7)
            blob = ((xx - cx) / 0.08) ** 2 + ((yy - cy) / 0.08) ** 2 < 1
            img[blob] = 150
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(
    root: Path,
    n_normal: int = 12,
    n_pneumonia: int = 24,
    size: int = 48,
    layout: str = "class_folders",
    seed: int = 0,
) -> Path:
    """Write a small data set with Kermany-style names; returns its root.

    ``layout`` is ``class_folders`` (NORMAL/, PNEUMONIA/) or ``kermany`` (train/val/test/...).
    Patients have one to three images each so patient grouping matters.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def folder(label: str, index: int) -> Path:
        if layout == "kermany":
            part = "test" if index % 5 == 0 else ("val" if index % 7 == 1 else "train")
            return root / part / label
        return root / label

    for i in range(n_normal):
        patient = i // 2
        name = f"IM-{patient:04d}-{i % 2 + 1:04d}.jpeg"
        path = folder("NORMAL", i) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), _xray_like(rng, size, False))
    for i in range(n_pneumonia):
        patient = i // 3
        kind = "bacteria" if i % 2 else "virus"
        name = f"person{patient}_{kind}_{i}.jpeg"
        path = folder("PNEUMONIA", i) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), _xray_like(rng, size, True))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """36 synthetic images (12 NORMAL, 24 PNEUMONIA) in class folders, 48x48."""
    return make_dataset(tmp_path / "tiny")


@pytest.fixture
def tiny_kermany(tmp_path: Path) -> Path:
    """A synthetic data set in the Kermany train/val/test layout."""
    return make_dataset(tmp_path / "chest_xray", n_normal=20, n_pneumonia=40, layout="kermany")


@pytest.fixture
def shared_dir() -> Path:
    """../shared, or skip the test when it is absent (it is absent on a fresh machine)."""
    if not (SHARED / "data" / "kermany224").is_dir():
        pytest.skip("../shared/data/kermany224 is not present on this machine")
    return SHARED


@pytest.fixture
def shared_mobilenet_weights(shared_dir: Path) -> Path:
    path = shared_dir / "weights" / "mobilenet_v2_0.35_224_no_top_imagenet.weights.h5"
    if not path.is_file():
        pytest.skip("../shared MobileNetV2 weights are not present")
    return path


@pytest.fixture(scope="session")
def test_artifacts(tmp_path_factory) -> Path:
    """Where tests leave files for a human to look at (render times, screenshots).

    ``$CXR_TEST_ARTIFACTS`` when set (a CI job can keep that folder); otherwise a folder in pytest's
    temporary directory, so a test run never writes into the project.
    """
    chosen = os.environ.get("CXR_TEST_ARTIFACTS")
    path = Path(chosen) if chosen else tmp_path_factory.getbasetemp() / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Keep every test's runs and feature cache out of the project and the user's home."""
    base = tmp_path_factory.mktemp("cxr-env")
    monkeypatch.setenv("CXR_RUNS_DIR", str(base / "runs"))
    monkeypatch.setenv("CXR_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("CXR_DATA_ROOT", str(base / "data"))
    # Hide the shipped demo run: tests of "no runs yet" must see none (tests of the demo unset this).
    monkeypatch.setenv("CXR_DEMO_RUN", str(base / "no-demo"))
    # Weights: no files found on the machine, and the ImageNet host "unreachable" (a closed local
    # port), so no test depends on, or reaches, the internet.
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(base / "weights"))
    monkeypatch.setenv("KERAS_HOME", str(base / "keras"))
    monkeypatch.setenv("CXR_IMAGENET_URL", "http://127.0.0.1:9/")
