"""Load a trained run; probabilities, labels, Grad-CAM heatmaps and overlays for new images.

``Predictor.from_run(run_dir)`` reads the run folder (``config.json``; ``metrics.json`` for the
decision threshold) and runs the network on one of two engines (``inference.engines.Engine``) with
the same probabilities and maps: LiteRT (``model.tflite``, ``inference.lite_runner``; no TensorFlow,
so a small server) when the folder has a current export, else Keras (``model.keras`` in safe mode,
``engine.keras_runner``, which imports TensorFlow only when it is needed). The run's ``Task`` turns
the engine's logits into each class's probability and a label:

    predict(grays)             -> [Prediction(label, probability, probabilities)]
    explain(grays, target)     -> [Explanation(... target, heatmap, caption)]
    predict_files(paths)       -> [{"file", "probability" | "probabilities", "label"} or {"file", "error"}]

With ``tta=True`` every image is seen in a few fixed views (``data.views``: shifts and a small zoom);
the logits are their mean and each map is the views' maps moved back into the image's frame and averaged,
so the map explains the averaged answer.

A heatmap shows the evidence for one class (``Explanation.target``), by default the predicted one.
Every head here is GlobalAveragePooling -> Dropout -> Dense, so a logit is ``sum_k w_k mean(A_k) + b``
and the signed map ``S = sum_k w_k A_k`` splits it over the image. For the one logit of a pneumonia
run, ReLU(S) is where the image raised the pneumonia score (Grad-CAM of the logit) and ReLU(-S) where
it lowered it (Grad-CAM of the negated logit: the evidence for NORMAL). For a softmax head (the
subtype task: NORMAL, BACTERIA, VIRUS) the map of class c is ReLU(S_c), where the image raised that
class's logit. Every map comes from the same forward pass as the probabilities.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from cxr_core.core.calibration import IDENTITY, Calibration
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadImageError, BadRunError, CxrError
from cxr_core.core.labels import DEFAULT_THRESHOLD
from cxr_core.core.tasks import CLASS_WORDS, Task, get_task
from cxr_core.data import views
from cxr_core.engine import litert
from cxr_core.inference.engines import Engine
from cxr_core.inference.lite_runner import LiteEngine
from cxr_core.io.images import load_gray, to_model_input
from cxr_core.runs.run_folder import MODEL_FILE, RunFolder, check_threshold

logger = logging.getLogger(__name__)

#: Images per forward pass (bounded memory: 16 x 299 x 299 x 3 float32 = 17 MB).
BATCH_SIZE = 16
ENGINES = ("auto", "litert", "keras")


def map_caption(target: str, empty: bool = False, task: str | Task = "pneumonia") -> str:
    """The one line that says what a heatmap explaining ``target`` shows (or that it shows nothing).

    A sigmoid head has one score, its positive class's: its maps show where the image raised that
    score, or lowered it (the evidence for the other class). A softmax head has one score per class.
    """
    task = get_task(task) if isinstance(task, str) else task
    if target not in task.classes:
        raise ValueError(f"A map explains one of {task.classes}; got {target!r}.")
    scored = task.classes[-1] if task.uses_threshold else target
    verb = "raised" if target == scored else "lowered"
    score = f"the {CLASS_WORDS[scored]} score"
    if not empty:
        evidence = "" if target == scored else f" (evidence for {target})"
        return f"Highlighted: regions that {verb} {score}{evidence}."
    decided = "the model's baseline and the threshold" if task.uses_threshold else "the model's baseline"
    return (f"No region {verb} {score}, so there is no map to show: the {target} call comes from {decided}, "
            "not from a place in the image.")


@dataclass(frozen=True)
class Prediction:
    """One image's answer.

    Attributes:
        label: the predicted class (a pneumonia run: PNEUMONIA when ``probability`` reaches the
            predictor's threshold; a subtype run: the most probable class).
        probability: the probability of disease: P(PNEUMONIA), or 1 - P(NORMAL) for a subtype run.
        probabilities: each class's probability, in the task's class order (they add up to 1).
    """

    label: str
    probability: float
    probabilities: dict[str, float]


@dataclass(frozen=True, eq=False)  # eq=False: an array field has no single truth value
class Explanation(Prediction):
    """A ``Prediction`` with the heatmap of the evidence for one class.

    Attributes:
        target: the class whose evidence ``heatmap`` shows (``label`` unless another was asked for).
        heatmap: float32 (h, w) in [0, 1] at the image's size; all zeros when there is no such evidence.
        task: the run's task (it decides what the caption says).
    """

    target: str
    heatmap: np.ndarray
    task: Task

    @property
    def empty(self) -> bool:
        """True when no region holds evidence for ``target`` (the map is all zeros)."""
        return not bool(np.any(self.heatmap > 0))

    @property
    def caption(self) -> str:
        """One line for a person: what the highlighted regions mean, or that there are none."""
        return map_caption(self.target, self.empty, self.task)


def _gray_checked(gray: Any) -> np.ndarray:
    """A 2-D uint8 image (an (h, w, 1) array or another numeric dtype is accepted, clipped to 0..255)."""
    arr = np.asarray(gray)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.number):
        raise BadImageError(
            f"Expected a 2-D grayscale image; got an array of shape {arr.shape} and type {arr.dtype}."
        )
    if arr.dtype != np.uint8:
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    return arr


class Predictor:
    """A trained classifier, its task and its decision threshold.

    Attributes:
        engine: what runs the network (``engine.name`` is ``"LiteRT"`` or ``"Keras"``).
        calibration: the run's calibration of the logits (the identity when it has none).
        tta: whether each image is seen in ``tta.VIEWS`` and the views' logits and maps averaged.
        task: the run's ``Task`` (``config.data.task``); ``classes`` are its classes, in the order of
            ``Prediction.probabilities``.
        config: the run's configuration.
        run_dir: the run folder it was loaded from (``None`` when built from an engine).
    """

    def __init__(self, engine: Engine, config: RunConfig, threshold: float = DEFAULT_THRESHOLD,
                 run_dir: Path | None = None, calibration: Calibration = IDENTITY, tta: bool = False) -> None:
        """Wrap an engine (``KerasEngine(classifier)``, ``LiteEngine(path)``) for a run of ``config``.

        ``calibration`` maps the engine's logits before they become probabilities (the run's own,
        fitted on validation; ``threshold`` is on the calibrated probabilities).

        Raises:
            BadRunError: when the engine's head does not fit the task (config.json and the model disagree).
        """
        self.engine = engine
        self.config = config
        self.task = get_task(config.data.task)
        self.classes = self.task.classes
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._threshold = check_threshold(threshold, "of a predictor")
        self.calibration = calibration
        self.tta = bool(tta)
        self.task.require_outputs(engine.n_outputs, f"the model in {self._where()}")

    @property
    def image_size(self) -> int:
        """Side of the square model input, in pixels."""
        return int(self.engine.image_size)

    @property
    def map_grid(self) -> tuple[int, int]:
        """(rows, columns) of the class-activation map before it is stretched to an image."""
        return self.engine.map_grid

    @property
    def threshold(self) -> float:
        """The probability of disease at or above which a pneumonia run calls PNEUMONIA (a subtype run
        calls the most probable class)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value, "of a predictor")

    @classmethod
    def from_run(cls, run_dir: str | Path, threshold: float | None = None, engine: str = "auto",
                 tta: bool | None = None) -> "Predictor":
        """Load a finished run folder.

        Args:
            run_dir: folder holding config.json, model.keras, (optionally) metrics.json and the
                LiteRT export model.tflite.
            threshold: overrides the threshold in metrics.json; when both are absent, 0.5.
            engine: ``"auto"`` (LiteRT when usable, else Keras), ``"litert"`` or ``"keras"``.
            tta: average a few fixed views of each image (see ``data.views``); ``None`` (default): as the
                run chose at the end of its training (``RunFolder.read_tta``).

        Raises:
            BadRunError: one sentence naming the run folder and what is missing or damaged.
        """
        if engine not in ENGINES:
            raise CxrError(f"The engine must be auto, litert or keras; got {engine!r}.")
        folder = RunFolder(run_dir)
        config = folder.read_config()
        if threshold is not None:
            chosen = check_threshold(threshold, "asked for")
        elif get_task(config.data.task).uses_threshold:
            chosen = folder.read_threshold()
        else:  # the most probable class is the label: no threshold was chosen
            chosen = DEFAULT_THRESHOLD
        if not folder.model_path.is_file():
            raise BadRunError(f"The run folder {folder.path} has no {MODEL_FILE}; its training may still be "
                              "running or may have failed.")
        runner = _lite_engine(folder, required=engine == "litert") if engine != "keras" else None
        if runner is None:
            # Imported here: the Keras engine imports TensorFlow (about 650 MB), which a run with a
            # current LiteRT export never needs.
            from cxr_core.engine.keras_runner import KerasEngine  # noqa: PLC0415

            runner = KerasEngine.load(folder.model_path, config.model.backbone, f"run folder {folder.path}")
        predictor = cls(runner, config, threshold=chosen, run_dir=folder.path, calibration=folder.read_calibration(),
                        tta=folder.read_tta() if tta is None else tta)
        if config.model.image_size and int(config.model.image_size) != predictor.image_size:
            # The saved model is the truth; the config may have been edited by hand.
            logger.warning("Run folder %s: config.json says image size %s but the model takes %d; using the model's.",
                           folder.path, config.model.image_size, predictor.image_size)
        logger.info("Loaded run %s with %s (threshold %.4f).", folder.path, runner.name, chosen)
        return predictor

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, grays: Sequence[np.ndarray]) -> list[Prediction]:
        """Each image's label and probabilities, in batches.

        Args:
            grays: 2-D uint8 arrays of any sizes.

        Raises:
            BadImageError: when an element is not a 2-D grayscale array.
        """
        out: list[Prediction] = []
        for start in range(0, len(grays), BATCH_SIZE):
            part = [_gray_checked(g) for g in grays[start:start + BATCH_SIZE]]
            inputs = self._inputs(part)
            if self.tta:
                out += self._predictions(views.mean_logits(self.engine.logits(views.make_views(inputs)),
                                                           len(views.VIEWS)))
            else:
                out += self._predictions(self.engine.logits(inputs))
        return out

    def explain(self, grays: Sequence[np.ndarray], target: str | None = None) -> list[Explanation]:
        """``predict`` with the heatmap of each image, from the same forward pass.

        Args:
            grays: 2-D uint8 arrays of any sizes.
            target: the class whose evidence every heatmap shows (one of ``classes``); ``None`` (the
                default) explains each image's predicted class.

        Returns:
            one ``Explanation`` per image, its heatmap float32 (h, w) in [0, 1] at the image's size.
        """
        channels = self.task.map_classes
        if target is not None and target not in channels:
            raise ValueError(f"A map explains one of {self.classes}; got {target!r}.")
        out: list[Explanation] = []
        for start in range(0, len(grays), BATCH_SIZE):
            part = [_gray_checked(g) for g in grays[start:start + BATCH_SIZE]]
            logits, cams = self._explained(self._inputs(part))
            for gray, found, cam in zip(part, self._predictions(logits), cams):
                shown = target or found.label
                heatmap = _finish_cam(cam[..., channels.index(shown)], gray.shape)
                out.append(Explanation(found.label, found.probability, found.probabilities, shown, heatmap, self.task))
        return out

    def predict_files(self, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
        """Classify image files; one unreadable file never stops the others.

        Returns:
            one dict per path, in order: {"file", "probability", "label"} (a task of more than two
            classes: {"file", "probabilities": {class: p}, "label"}) or {"file", "error"} where error
            is one sentence.
        """
        paths = [str(p) for p in paths]
        results: list[dict[str, Any]] = []
        # Decode a chunk, predict it, move on: memory stays bounded for thousands of files.
        for start in range(0, len(paths), BATCH_SIZE):
            chunk = paths[start:start + BATCH_SIZE]
            records: list[dict[str, Any]] = [{"file": path} for path in chunk]
            grays: dict[int, np.ndarray] = {}
            for i, path in enumerate(chunk):
                try:
                    grays[i] = load_gray(path)
                except CxrError as error:
                    records[i]["error"] = str(error)
                except Exception as error:  # a decoder bug must not lose the rest of the batch
                    logger.exception("Unexpected error reading %s", path)
                    records[i]["error"] = f"This file could not be read as an image ({type(error).__name__})."
            for i, found in zip(grays, self.predict(list(grays.values()))):
                records[i].update(self._record(found))
            results += records
        return results

    # -- helpers -------------------------------------------------------------------------------

    def _inputs(self, grays: list[np.ndarray]) -> np.ndarray:
        return np.stack([to_model_input(g, self.image_size) for g in grays]).astype(np.float32)

    def _explained(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and raw maps of a batch; with ``tta``, the views' mean logits and their maps in each image's frame."""
        if not self.tta:
            return self.engine.explain(inputs)
        logits, cams = self.engine.explain(views.make_views(inputs))
        # A one-logit head's two channels are ReLU(S) and ReLU(-S) of one signed map: average S itself.
        signed = self.task.n_outputs == 1
        return (views.mean_logits(logits, len(views.VIEWS)),
                views.aligned_maps(cams, self.image_size, signed=signed))

    def _predictions(self, logits: np.ndarray) -> list[Prediction]:
        probabilities = self.task.probabilities(self.calibration.logits(logits))
        labels = self.task.labels(probabilities, self._threshold)
        disease = self.task.disease_probability(probabilities)
        return [Prediction(label, float(p), {c: float(v) for c, v in zip(self.classes, row)})
                for label, p, row in zip(labels, disease, probabilities)]

    def _record(self, found: Prediction) -> dict[str, Any]:
        """A prediction in the command line's JSON: of two classes, one probability says it all."""
        if self.task.is_binary:
            return {"probability": found.probability, "label": found.label}
        return {"probabilities": found.probabilities, "label": found.label}

    def _where(self) -> str:
        return f"run folder {self.run_dir}" if self.run_dir is not None else "this predictor"


def _lite_engine(folder: RunFolder, required: bool) -> LiteEngine | None:
    """The run's LiteRT engine, or None (logged) when its export cannot be used; one sentence instead
    when LiteRT was ``required``."""
    reason = litert.lite_status(folder.path)
    if reason is None:
        try:
            return LiteEngine(folder.lite_path)
        except BadRunError as error:
            reason = str(error)
    if required:
        raise BadRunError(f"The run folder {folder.path} cannot be run with LiteRT: "
                          f"{reason[:1].lower()}{reason[1:].rstrip('.')}.")
    logger.info("Run %s: using Keras because %s.", folder.path, reason)
    return None


def _finish_cam(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One ReLU'd class-activation map (h', w') -> [0, 1], resized to ``shape`` (h, w)."""
    cam = np.maximum(np.nan_to_num(cam.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    h, w = int(shape[0]), int(shape[1])
    if peak <= 0.0:
        return np.zeros((h, w), np.float32)
    cam = cam / peak
    # The model saw the image squashed to a square; stretching the map back undoes that exactly.
    out = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def overlay_heatmap(gray: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """Blend a JET-coloured heatmap over the grayscale image.

    Args:
        gray: 2-D uint8 image (h, w).
        heatmap: float in [0, 1]; resized to (h, w) when its size differs.
        opacity: weight of the heatmap, 0 (image only) to 1 (heatmap only).

    Returns:
        RGB uint8 (h, w, 3).
    """
    gray = _gray_checked(gray)
    opacity = float(opacity)
    if not (0.0 <= opacity <= 1.0):
        raise CxrError(f"The heatmap opacity must be between 0 and 1; got {opacity}.")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise CxrError(f"The heatmap must be a 2-D array; got shape {heat.shape}.")
    h, w = gray.shape
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    heat8 = np.uint8(np.round(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255))
    # applyColorMap works in BGR; convert both to RGB before blending.
    colour = cv2.cvtColor(cv2.applyColorMap(heat8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(colour, opacity, base, 1.0 - opacity, 0.0)
