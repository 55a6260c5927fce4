"""The LiteRT engine: ``model.tflite`` run without TensorFlow (``engine.litert`` describes the export).

It implements ``cxr_core.inference.engines.Engine`` in about 50 MB of memory, so a predicting process
(the app) never imports TensorFlow when a run folder holds a current export.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from cxr_core.core.errors import BadRunError

log = logging.getLogger(__name__)


class LiteEngine:
    """Runs ``model.tflite``: logits, or logits and the class-activation maps, for batches of images.

    The interpreter is not thread-safe and a Streamlit server shares one predictor between
    sessions, so calls are serialised by a lock (one image takes milliseconds).
    """

    name = "LiteRT"

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        try:
            # Imported here: the runtime's native library may fail to load on a platform where the
            # package installs; that is one sentence and the Keras engine, not a failed import.
            from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
        except ImportError as error:
            log.warning("The LiteRT runtime cannot be loaded: %s", error)
            raise BadRunError("The LiteRT runtime (ai-edge-litert) is installed but cannot be loaded here.") from error

        self.path = Path(path)
        threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        try:
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
            inputs = self._interpreter.get_input_details()
            outputs = self._interpreter.get_output_details()
        except Exception as error:  # a damaged flatbuffer raises ValueError or RuntimeError
            raise BadRunError(
                f"{self.path.name} in {self.path.parent} is not a LiteRT model this version can run."
            ) from error
        # The graph is converted without a signature, so the outputs are told apart by rank: the
        # logits are (n,) or (n, c), the maps (n, h', w', channels).
        by_rank = {len(detail["shape_signature"]): detail for detail in outputs}
        logit = by_rank.get(1) or by_rank.get(2)
        cams = list(by_rank[4]["shape_signature"]) if 4 in by_rank else []
        shape = list(inputs[0]["shape_signature"]) if len(inputs) == 1 else []
        logits = int(np.prod(logit["shape_signature"][1:])) if logit is not None else 0
        if len(outputs) != 2 or not _is_classifier(shape, logits, cams):
            raise BadRunError(
                f"{self.path.name} in {self.path.parent} is not an exported classifier (input {shape}, "
                f"{len(outputs)} outputs)."
            )
        #: The head's logits: one for a sigmoid head, else one per class.
        self.n_outputs = logits
        self.image_size = int(shape[1])
        self._map_grid = (int(cams[1]), int(cams[2]))
        self._input_index = inputs[0]["index"]
        self._logit_index, self._cam_index = logit["index"], by_rank[4]["index"]
        self._batch = 0
        self._lock = threading.Lock()

    @property
    def map_grid(self) -> tuple[int, int]:
        """(rows, columns) of the raw maps ``explain`` returns."""
        return self._map_grid

    def _run(self, batch: np.ndarray, with_cam: bool) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            if batch.shape[0] != self._batch:  # the batch dimension is dynamic; re-plan for a new size
                self._interpreter.resize_tensor_input(self._input_index, list(batch.shape), strict=True)
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input_index, batch)
            self._interpreter.invoke()
            logits = np.array(self._interpreter.get_tensor(self._logit_index)).reshape(len(batch), -1)
            cams = np.array(self._interpreter.get_tensor(self._cam_index)) if with_cam else None
        return logits, cams

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, size, size, 3) in 0..255 -> logits (n, n_outputs)."""
        return self._run(batch, with_cam=False)[0]

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, size, size, 3) -> (logits (n, n_outputs), raw maps (n, h', w', channels) in
        ``Task.map_classes`` order)."""
        return self._run(batch, with_cam=True)


def _is_classifier(shape: list, logits: int, cams: list) -> bool:
    """Whether an input ``shape``, a head of ``logits`` and maps of shape ``cams`` are an export of ours:
    square three-channel images, and one map per class (a one-logit head has two: where the image raised
    its logit, and where it lowered it) on a grid of static size."""
    square = len(shape) == 4 and shape[1] == shape[2] and shape[1] >= 1 and shape[3] == 3
    return square and logits >= 1 and len(cams) == 4 and min(cams[1:]) >= 1 and cams[3] == max(2, logits)
