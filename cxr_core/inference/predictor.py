"""Load a trained run; probabilities, Grad-CAM heatmaps and overlays for new images.

``Predictor.from_run(run_dir)`` reads the run folder (``config.json``, ``metrics.json`` for the
decision threshold) and runs the network on one of two engines: LiteRT (``model.tflite``, see
``cxr_core.engine.litert``; no TensorFlow, so a small server) when the folder has a current export, else
Keras (``model.keras`` in safe mode, two compiled functions: batched probabilities, and the
probability with the Grad-CAM maps in a single forward pass). Both give the same probabilities
and heatmaps. TensorFlow is imported lazily so ``import cxr_core.inference.predictor`` stays light.

A heatmap shows the evidence for one class (``Explanation.target``), by default the predicted one.
Every head here is GlobalAveragePooling -> Dropout -> Dense(1), so the PNEUMONIA logit is
``sum_k w_k mean(A_k) + b`` and the signed map ``S = sum_k w_k A_k`` splits it over the image:
ReLU(S) is where the image raised the pneumonia score (Grad-CAM of the logit), ReLU(-S) where it
lowered it (Grad-CAM of the negated logit: the evidence for NORMAL). Both come from the same pass.

A run of the ``subtype`` task (``labels.TASK_CLASSES``) has a softmax head, Dense(3) over NORMAL,
BACTERIA and VIRUS: its label is the most probable class, its ``probability`` is P(PNEUMONIA) =
1 - P(NORMAL), and the map of class c is ReLU(S_c) with S_c = sum_k w_kc A_k, where the image
raised that class's logit (Grad-CAM of the logit, up to a positive factor), by default for the
predicted class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import cv2
import numpy as np

from cxr_core.core.backbones import BACKBONES
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadImageError, BadRunError, CxrError
from cxr_core.core.labels import DEFAULT_THRESHOLD, NEGATIVE, POSITIVE, classes_for, label_for, sigmoid
from cxr_core.engine import litert
from cxr_core.io.images import load_gray, to_model_input
from cxr_core.runs.run_folder import MODEL_FILE, RunFolder, check_threshold

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)

#: Images per forward pass in batched prediction (bounded memory: 32 x 299 x 299 x 3 float32 = 34 MB).
BATCH_SIZE = 16

#: The class each channel of an engine's raw maps ``(n, h', w', 2)`` explains: ReLU(S), ReLU(-S).
MAP_CHANNELS = (POSITIVE, NEGATIVE)

#: What a heatmap's highlighted regions mean, one line per class it explains.
MAP_CAPTIONS = {
    POSITIVE: "Highlighted: regions that raised the pneumonia score.",
    NEGATIVE: "Highlighted: regions that lowered the pneumonia score (evidence for NORMAL).",
}
#: Said instead of showing an all-zero map (no region holds evidence for the class it explains).
EMPTY_MAP_CAPTIONS = {
    POSITIVE: "No region raised the pneumonia score, so there is no map to show: the PNEUMONIA call "
              "comes from the model's baseline and the threshold, not from a place in the image.",
    NEGATIVE: "No region lowered the pneumonia score, so there is no map to show: the NORMAL call "
              "comes from the model's baseline and the threshold, not from a place in the image.",
}

#: The same for a ``subtype`` run, whose map of a class shows where the image raised that class's score.
_SUBTYPE_NAMES = {"NORMAL": "normal", "BACTERIA": "bacterial pneumonia", "VIRUS": "viral pneumonia"}
SUBTYPE_MAP_CAPTIONS = {
    cls: f"Highlighted: regions that raised the {name} score." for cls, name in _SUBTYPE_NAMES.items()
}
SUBTYPE_EMPTY_MAP_CAPTIONS = {
    cls: f"No region raised the {name} score, so there is no map to show: the {cls} call comes from "
         "the model's baseline, not from a place in the image."
    for cls, name in _SUBTYPE_NAMES.items()
}


def map_caption(target: str, empty: bool = False, task: str = "pneumonia") -> str:
    """The one line that says what a heatmap explaining ``target`` shows (or that it shows nothing)."""
    captions, empties = ((SUBTYPE_MAP_CAPTIONS, SUBTYPE_EMPTY_MAP_CAPTIONS) if task == "subtype"
                         else (MAP_CAPTIONS, EMPTY_MAP_CAPTIONS))
    if target not in captions:
        raise ValueError(f"A map explains one of {classes_for('subtype' if task == 'subtype' else 'pneumonia')}; "
                         f"got {target!r}.")
    return empties[target] if empty else captions[target]


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row maximum, so large logits do not overflow)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _n_outputs(classes: Sequence[str]) -> int:
    """The number of logits a head for ``classes`` has (as ``model.n_outputs_for``): one sigmoid for two."""
    return 1 if len(classes) == 2 else len(classes)


@dataclass(frozen=True, eq=False)  # eq=False: an array field has no single truth value
class Explanation:
    """One image's probability, label and the heatmap of the evidence for one class.

    Attributes:
        probability: probability of PNEUMONIA (for a subtype run, 1 - P(NORMAL)).
        label: the predicted class at the predictor's threshold (for a subtype run, the most probable class).
        target: the class whose evidence ``heatmap`` shows (``label`` unless another was asked for).
        heatmap: float32 (h, w) in [0, 1] at the image's size; all zeros when there is no such evidence.
        probabilities: each class's probability, in the task's class order (for a binary run
            {"NORMAL": 1 - probability, "PNEUMONIA": probability}, filled in when not given).
        task: the run's task, ``pneumonia`` or ``subtype`` (it decides what the caption says).
    """

    probability: float
    label: str
    target: str
    heatmap: np.ndarray
    probabilities: dict[str, float] | None = None
    task: str = "pneumonia"

    def __post_init__(self) -> None:
        if self.probabilities is None:
            p = float(self.probability)
            object.__setattr__(self, "probabilities", {NEGATIVE: 1.0 - p, POSITIVE: p})

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


class KerasEngine:
    """Runs a Keras classifier with TensorFlow: logits, or logits and Grad-CAM maps, for batches.

    ``explain`` returns the logits ``(n,)`` and raw maps ``(n, h', w', 2)``, one channel per class
    of ``MAP_CHANNELS`` (the LiteRT engine returns the same). A head with several outputs (a
    softmax over the task's classes) gives logits ``(n, c)`` and maps ``(n, h', w', c)``, one per class."""

    name = "Keras"

    def __init__(self, classifier: "keras.Model", config: RunConfig, where: str) -> None:
        self.classifier = classifier
        self.config = config
        self._where = where
        shape = classifier.input_shape
        if isinstance(shape, list):  # a model with several inputs is not one of ours
            raise BadRunError(f"The model in {where} takes several inputs; it is not an image classifier.")
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise BadRunError(
                f"The model in {where} expects input of shape {shape}, not a square three-channel image."
            )
        self.image_size = int(shape[1])
        out = classifier.output_shape
        # (n, c) logits: c > 1 is a softmax head; anything else is read as the one-logit head it always was.
        self.n_outputs = int(out[-1]) if isinstance(out, tuple) and len(out) == 2 and out[-1] else 1
        self._predict_fn = None
        self._explain_fn = None

    def logits(self, batch: np.ndarray) -> np.ndarray:
        if self._predict_fn is None:
            import tensorflow as tf  # noqa: PLC0415 - lazy: only the Keras engine needs TensorFlow

            model = self.classifier
            # One trace for any batch size; training=False keeps Dropout and BatchNorm in inference mode.
            self._predict_fn = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)],
            )
        return _shaped(self._predict_fn(np.asarray(batch, np.float32)).numpy(), self.n_outputs)

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._explain_fn is None:
            self._explain_fn = _make_explain_fn(self.classifier, self.config, self.image_size, self._where)
        logits, cams = self._explain_fn(np.asarray(batch, np.float32))
        return _shaped(logits.numpy(), self.n_outputs), cams.numpy()


def _shaped(logits: np.ndarray, n_outputs: int) -> np.ndarray:
    """Logits as ``(n,)`` for a one-logit head (unchanged binary shape), else ``(n, n_outputs)``."""
    return logits.reshape(-1) if n_outputs == 1 else logits.reshape(-1, n_outputs)


class Predictor:
    """A trained classifier with its decision threshold.

    The network runs on one of two engines with the same results: ``LiteRT`` (``model.tflite``,
    no TensorFlow, about 50 MB) when the run folder has a current export and the runtime is
    installed, else ``Keras`` (``model.keras`` through TensorFlow).

    Attributes:
        threshold: probability at or above which an image is called PNEUMONIA (a pneumonia run; a
            subtype run calls the most probable class).
        task: the run's task (``config.data.task``): ``pneumonia`` or ``subtype``.
        classes: the task's classes, in the order of ``probabilities``' columns.
        image_size: side of the square model input, in pixels.
        config: the run's configuration.
        run_dir: the run folder it was loaded from (``None`` when built from a model object).
        engine: ``"LiteRT"`` or ``"Keras"``.
        classifier: the Keras model on the Keras engine, else ``None``.
    """

    def __init__(
        self,
        classifier: Any,
        config: RunConfig,
        threshold: float = DEFAULT_THRESHOLD,
        run_dir: Path | None = None,
    ) -> None:
        """Wrap a loaded classifier (image in 0..255 -> logit) or an engine.

        Args:
            classifier: a Keras model from ``model.build_classifier`` / ``model.load_classifier``,
                or an engine (``KerasEngine`` / ``litert.LiteEngine``).
            config: the run configuration (its backbone names the Grad-CAM layer).
            threshold: decision threshold in [0, 1].
            run_dir: where it came from, for messages.
        """
        self.config = config
        self.task = config.data.task
        self.classes = classes_for(self.task)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._threshold = check_threshold(threshold, "of a predictor")
        if hasattr(classifier, "explain") and hasattr(classifier, "logits"):
            self._engine = classifier
        else:
            self._engine = KerasEngine(classifier, config, self._where())
        self.classifier = getattr(self._engine, "classifier", None)
        self.image_size = int(self._engine.image_size)
        expected, found = _n_outputs(self.classes), int(getattr(self._engine, "n_outputs", 1))
        if found != expected:
            raise BadRunError(
                f"The model in {self._where()} has {found} output{'s' if found != 1 else ''} but its {self.task} "
                f"task needs {expected} ({', '.join(self.classes)}); config.json and the model do not belong together."
            )

    @property
    def engine(self) -> str:
        """``"LiteRT"`` or ``"Keras"``."""
        return self._engine.name

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run_dir: str | Path, threshold: float | None = None, engine: str = "auto") -> "Predictor":
        """Load a finished run folder.

        Args:
            run_dir: folder holding config.json, model.keras, (optionally) metrics.json and the
                LiteRT export model.tflite.
            threshold: overrides the threshold in metrics.json; when both are absent, 0.5.
            engine: ``"auto"`` (LiteRT when usable, else Keras), ``"litert"`` or ``"keras"``.

        Returns:
            a ready Predictor.

        Raises:
            BadRunError: one sentence naming the run folder and what is missing or damaged.
        """
        if engine not in ("auto", "litert", "keras"):
            raise CxrError(f"The engine must be auto, litert or keras; got {engine!r}.")
        folder = RunFolder(run_dir)
        run_dir = folder.path
        config = folder.read_config()
        if threshold is not None:
            chosen = check_threshold(threshold, "asked for")
        elif config.data.task != "pneumonia":  # no threshold: the most probable class is the label
            chosen = DEFAULT_THRESHOLD
        else:
            chosen = folder.read_threshold()

        model_path = folder.model_path
        if not model_path.is_file():
            raise BadRunError(
                f"The run folder {run_dir} has no {MODEL_FILE}; its training may still be running or may have failed."
            )
        runner = None
        if engine != "keras":
            reason = litert.lite_status(run_dir)
            if reason is None:
                try:
                    runner = litert.LiteEngine(folder.lite_path)
                except BadRunError as error:
                    reason = str(error)
            if runner is None:
                if engine == "litert":
                    raise BadRunError(
                        f"The run folder {run_dir} cannot be run with LiteRT: {_lower_first(reason).rstrip('.')}."
                    )
                logger.info("Run %s: using Keras because %s.", run_dir, reason)
        if runner is None:
            from cxr_core.engine.model import load_classifier  # noqa: PLC0415 - model imports Keras

            try:
                classifier = load_classifier(model_path)
            except CxrError as error:
                raise BadRunError(
                    f"The {MODEL_FILE} in run folder {run_dir} cannot be loaded as a Keras model; "
                    "the file is damaged or not a model."
                ) from error
            runner = KerasEngine(classifier, config, f"run folder {run_dir}")
        predictor = cls(runner, config, threshold=chosen, run_dir=run_dir)
        if config.model.image_size and int(config.model.image_size) != predictor.image_size:
            # The saved model is the truth; the config may have been edited by hand.
            logger.warning(
                "Run folder %s: config.json says image size %s but the model takes %d; using the model's.",
                run_dir, config.model.image_size, predictor.image_size,
            )
        logger.info("Loaded run %s with %s (threshold %.4f).", run_dir, predictor.engine, chosen)
        return predictor

    # -- threshold -----------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        """Decision threshold in [0, 1]."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value, "of a predictor")

    def label(self, probability: float) -> str:
        """``PNEUMONIA`` when ``probability >= threshold``, else ``NORMAL``."""
        return label_for(probability, self._threshold)

    @property
    def multiclass(self) -> bool:
        """True for a softmax head (the subtype task): the label is the most probable class."""
        return _n_outputs(self.classes) > 1

    # -- probabilities -------------------------------------------------------------------------

    def _class_rows(self, logits: np.ndarray) -> np.ndarray:
        """Engine logits -> float64 (n, len(classes)) probabilities, in ``classes`` order."""
        if self.multiclass:
            return _softmax(np.asarray(logits).reshape(-1, len(self.classes)))
        p = sigmoid(np.asarray(logits).reshape(-1))
        return np.stack([1.0 - p, p], axis=1)

    def probability_rows(self, batch: np.ndarray) -> np.ndarray:
        """Each class's probability for model-ready inputs (float32 (n, size, size, 3) in 0..255).

        Returns:
            float64 (n, len(classes)), columns in ``classes`` order, each row summing to 1.
        """
        out = []
        for start in range(0, len(batch), BATCH_SIZE):
            out.append(self._class_rows(self._engine.logits(np.asarray(batch[start : start + BATCH_SIZE], np.float32))))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float64)

    def probabilities(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """Each class's probability for several grayscale images, batched.

        Args:
            grays: 2-D uint8 arrays of any sizes.

        Returns:
            float64 (n, len(classes)): for a pneumonia run the columns NORMAL, PNEUMONIA; for a
            subtype run NORMAL, BACTERIA, VIRUS. Each row sums to 1.

        Raises:
            BadImageError: when an element is not a 2-D uint8 array.
        """
        out = []
        for start in range(0, len(grays), BATCH_SIZE):
            out.append(self.probability_rows(self._inputs(grays[start : start + BATCH_SIZE])))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float64)

    def _label_of_row(self, row: np.ndarray) -> str:
        """The predicted class of one row of ``probabilities``."""
        if self.multiclass:
            return self.classes[int(np.argmax(row))]
        return self.label(float(row[1]))

    def _inputs(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([to_model_input(_gray_checked(g), self.image_size) for g in grays]).astype(np.float32)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for model-ready inputs.

        Args:
            batch: float32 (n, size, size, 3) in 0..255.

        Returns:
            float64 (n,) probabilities of PNEUMONIA (for a subtype run, 1 - P(NORMAL)).
        """
        if self.multiclass:
            return 1.0 - self.probability_rows(batch)[:, 0]
        out = []
        for start in range(0, len(batch), BATCH_SIZE):
            out.append(sigmoid(self._engine.logits(np.asarray(batch[start : start + BATCH_SIZE], np.float32))))
        return np.concatenate(out) if out else np.zeros(0, np.float64)

    def predict_grays(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities of PNEUMONIA for several grayscale images, batched.

        Args:
            grays: 2-D uint8 arrays of any sizes.

        Returns:
            float64 (n,) probabilities.

        Raises:
            BadImageError: when an element is not a 2-D uint8 array.
        """
        out = []
        for start in range(0, len(grays), BATCH_SIZE):
            out.append(self.predict_batch(self._inputs(grays[start : start + BATCH_SIZE])))
        return np.concatenate(out) if out else np.zeros(0, np.float64)

    def predict_gray(self, gray: np.ndarray) -> float:
        """Probability of PNEUMONIA for one 2-D uint8 grayscale image."""
        return float(self.predict_grays([gray])[0])

    def _result(self, name: str, probability: float) -> dict[str, Any]:
        return {"file": name, "probability": float(probability), "label": self.label(probability)}

    def _row_result(self, name: str, row: np.ndarray) -> dict[str, Any]:
        """A prediction for a person: the binary format, or each class's probability for a subtype run."""
        if not self.multiclass:
            return self._result(name, float(row[1]))
        return {"file": name, "probabilities": {c: float(p) for c, p in zip(self.classes, row)},
                "label": self._label_of_row(row)}

    def predict_bytes(self, data: bytes, name: str | None = None) -> dict[str, Any]:
        """Classify an uploaded file (JPEG, PNG, BMP, TIFF or DICOM bytes).

        Args:
            data: the file's bytes.
            name: the file name (its suffix helps decoding), used as ``file`` in the result.

        Returns:
            {"file", "probability", "label"}; for a subtype run {"file", "probabilities": {class: p}, "label"}.

        Raises:
            BadImageError: when the bytes are not a usable image.
        """
        gray = load_gray(data, name)
        return self._row_result(name or "upload", self.probabilities([gray])[0])

    def predict_files(self, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
        """Classify image files; one unreadable file never stops the others.

        Args:
            paths: image files.

        Returns:
            one dict per path, in order: {"file", "probability", "label"} (for a subtype run
            {"file", "probabilities": {class: p}, "label"}) or {"file", "error"} where error is a
            one-sentence explanation.
        """
        paths = [str(p) for p in paths]
        results: list[dict[str, Any] | None] = [None] * len(paths)
        # Decode a chunk, predict it, move on: memory stays bounded for thousands of files.
        for start in range(0, len(paths), BATCH_SIZE):
            chunk = range(start, min(start + BATCH_SIZE, len(paths)))
            good: list[int] = []
            inputs: list[np.ndarray] = []
            for i in chunk:
                try:
                    inputs.append(self._inputs([load_gray(paths[i])])[0])
                    good.append(i)
                except CxrError as error:
                    results[i] = {"file": paths[i], "error": str(error)}
                except Exception as error:  # a decoder bug must not lose the rest of the batch
                    logger.exception("Unexpected error reading %s", paths[i])
                    results[i] = {"file": paths[i],
                                  "error": f"This file could not be read as an image ({type(error).__name__})."}
            if good:
                rows = self.probability_rows(np.stack(inputs))
                for i, row in zip(good, rows):
                    results[i] = self._row_result(paths[i], row)
        return [r for r in results if r is not None]

    # -- Grad-CAM ------------------------------------------------------------------------------

    def explanations(self, grays: Sequence[np.ndarray], target: str | None = None) -> list[Explanation]:
        """Probabilities, labels and heatmaps of several images, one forward pass per batch.

        Args:
            grays: 2-D uint8 arrays of any sizes.
            target: the class whose evidence every heatmap shows (``"PNEUMONIA"`` or ``"NORMAL"``;
                for a subtype run one of ``classes``); ``None`` (the default) explains each image's
                predicted class.

        Returns:
            one ``Explanation`` per image, its heatmap float32 (h, w) in [0, 1] at the image's size.
        """
        # The engines' map channels: (PNEUMONIA, NORMAL) for a one-logit head, else one per class.
        channels = self.classes if self.multiclass else MAP_CHANNELS
        if target is not None and target not in channels:
            raise ValueError(f"A map explains one of {tuple(self.classes)}; got {target!r}.")
        out: list[Explanation] = []
        for start in range(0, len(grays), BATCH_SIZE):
            part = [_gray_checked(g) for g in grays[start : start + BATCH_SIZE]]
            logits, cams = self._engine.explain(self._inputs(part))
            rows = self._class_rows(logits)
            for gray, row, cam in zip(part, rows, cams):
                if self.multiclass:
                    probability, label = 1.0 - float(row[0]), self._label_of_row(row)
                else:
                    probability = float(row[1])
                    label = self.label(probability)
                explained = target or label
                heatmap = _finish_cam(cam[..., channels.index(explained)], gray.shape)
                out.append(Explanation(probability, label, explained, heatmap,
                                       {c: float(p) for c, p in zip(self.classes, row)}, self.task))
        return out

    def explanation(self, gray: np.ndarray, target: str | None = None) -> Explanation:
        """``explanations`` of one image."""
        return self.explanations([gray], target)[0]

    def explain_batch(
        self, grays: Sequence[np.ndarray], target: str | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Probabilities and heatmaps of several images (``explanations`` without the labels).

        Returns:
            (probabilities float64 (n,), heatmaps: float32 (h, w) in [0, 1], each at its image's size,
            each showing the evidence for ``target``, by default the image's predicted class).
        """
        found = self.explanations(grays, target)
        return np.array([e.probability for e in found], np.float64), [e.heatmap for e in found]

    def explain(self, gray: np.ndarray, target: str | None = None) -> tuple[float, np.ndarray]:
        """Probability and heatmap of one image from a single forward pass (see ``explain_batch``)."""
        found = self.explanation(gray, target)
        return found.probability, found.heatmap

    def gradcam(self, gray: np.ndarray, target: str | None = None) -> np.ndarray:
        """Grad-CAM heatmap of the evidence for ``target`` (by default the predicted class).

        Args:
            gray: 2-D uint8 image.
            target: ``"PNEUMONIA"`` (regions that raised the pneumonia logit), ``"NORMAL"`` (regions
                that lowered it) or ``None``.

        Returns:
            float32 (h, w) in [0, 1] at the image's own size; all zeros when no region holds such evidence.
        """
        return self.explanation(gray, target).heatmap

    def gradcam_batch(self, grays: Sequence[np.ndarray], target: str | None = None) -> list[np.ndarray]:
        """Grad-CAM heatmaps of several images (batched forward passes)."""
        return self.explain_batch(grays, target)[1]

    def warmup(self) -> None:
        """Trace both compiled functions now (about 1-2 s), so the first real image is fast."""
        blank = np.zeros((self.image_size, self.image_size), np.uint8)
        self.predict_gray(blank)
        self.explain(blank)

    def _where(self) -> str:
        return f"run folder {self.run_dir}" if self.run_dir is not None else "this predictor"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text else text


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


def _make_explain_fn(classifier: "keras.Model", config: RunConfig, size: int, where: str):
    """A compiled function: images (n, size, size, 3) -> (logits (n,), raw CAMs (n, h', w', 2)).

    For a head with c > 1 outputs: (logits (n, c), CAMs (n, h', w', c)), ReLU(sum_k w_kc A_k) per
    class, without a gradient (the same maps as the LiteRT export). Built once per predictor; the
    fixed input signature means one trace for every batch size.
    """
    import tensorflow as tf  # noqa: PLC0415 - lazy: only the Keras engine needs TensorFlow

    from cxr_core.engine.model import EnsembleGradcamParts, gradcam_parts  # noqa: PLC0415 - model imports Keras

    spec = BACKBONES.get(config.model.backbone)
    try:
        parts = gradcam_parts(classifier, spec.last_conv_layer if spec is not None else None)
    except (ValueError, KeyError, AttributeError) as error:
        raise BadRunError(f"The model in {where} lacks the layers Grad-CAM needs ({error}).") from error
    if isinstance(parts, EnsembleGradcamParts):
        return _make_ensemble_explain_fn(parts, size)
    kernel = np.asarray(parts.logit.get_weights()[0], np.float32)
    if kernel.shape[-1] > 1:
        kernel = tf.constant(kernel)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def explain_classes(images):
            # Each class's logit is sum_k w_kc mean(A_k) + b_c: its Grad-CAM weights are w_kc / (h' w').
            conv, logits = parts.forward(images)
            return logits, tf.nn.relu(tf.tensordot(conv, kernel, axes=[[3], [0]]))

        return explain_classes

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def explain(images):
        with tf.GradientTape() as tape:
            conv, logits = parts.forward(images)
            logits = tf.reshape(logits, [-1])
            # Each image's logit depends only on its own maps, so the gradient of the sum is the
            # per-image gradient. The sum must be taken under the tape, or the gradient is None.
            total = tf.reduce_sum(logits)
        grads = tape.gradient(total, conv)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        signed = tf.reduce_sum(conv * weights, axis=-1)
        # Grad-CAM of the logit and of its negation (the evidence for NORMAL), in MAP_CHANNELS order.
        return logits, tf.stack([tf.nn.relu(signed), tf.nn.relu(-signed)], axis=-1)

    return explain


def _make_ensemble_explain_fn(parts, size: int):
    """The compiled explain function of an ensemble (``model.EnsembleGradcamParts``).

    Grad-CAM of the ensemble's logit at every member's last conv layer: each member's weights are
    the spatial mean of the gradient times its grid's cell count (per unit of image area, so grids
    of different sizes weigh alike), its map is ReLU'd, and the maps are summed on the largest grid.
    The NORMAL channel does the same with each member's negated map.
    """
    import tensorflow as tf  # noqa: PLC0415 - lazy: only the Keras engine needs TensorFlow

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def explain(images):
        with tf.GradientTape() as tape:
            convs, _, logits = parts.forward(images)
            logits = tf.reshape(logits, [-1])
            total = tf.reduce_sum(logits)  # per-image gradients, as in the single-model function
        grads = tape.gradient(total, convs)
        raised, lowered = [], []
        for conv, grad in zip(convs, grads):
            cells = float(conv.shape[1] * conv.shape[2])
            weights = tf.reduce_mean(grad, axis=[1, 2], keepdims=True) * cells
            signed = tf.reduce_sum(conv * weights, axis=-1)
            raised.append(tf.nn.relu(signed))
            lowered.append(tf.nn.relu(-signed))
        return logits, tf.stack([parts.combine_maps(raised), parts.combine_maps(lowered)], axis=-1)

    return explain


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
