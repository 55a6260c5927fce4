"""Where training runs: one device, several devices of one machine, or several machines.

``setup(distribute, precision, cpu_replicas)`` chooses a ``tf.distribute`` strategy and a Keras
precision policy once per process, before TensorFlow initialises its devices, and returns a
``Runtime`` that training reads: the strategy, how many replicas train in step, whether this process
is the chief (the one that writes the run folder), and the fields that say where the run trains
(``Runtime.fields``, written to status.json and to the "runtime" progress event).

- ``off``: TensorFlow's default strategy (one device, as before).
- ``mirrored``: ``MirroredStrategy`` over the local GPUs, or over ``cpu_replicas`` logical CPU
  devices (for teaching and tests on a machine without a GPU).
- ``multi-worker``: ``MultiWorkerMirroredStrategy`` over the machines that the standard
  ``TF_CONFIG`` environment variable names; every worker runs the same command.
- ``auto``: ``mirrored`` when more than one GPU is visible (or ``cpu_replicas`` is 2 or more),
  else ``off``. It never picks ``multi-worker``: joining a cluster is always asked for.

Batch and learning rate: ``TrainConfig.batch_size`` is per replica, so a step trains on the global
batch ``batch_size x replicas``; the learning rate stays as configured (see ``LEARNING_RATE_RULE``).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from cxr_core.core import settings
from cxr_core.core.config import DISTRIBUTE_MODES, PRECISIONS
from cxr_core.core.errors import BadSettingError, CxrError
from cxr_core.runs.heartbeat import this_host

#: Seconds a collective operation (a gradient all-reduce, a barrier) may wait for the other workers
#: before the run fails: a dead worker then ends the run instead of hanging it. Long enough for the
#: chief's validation pass between epochs; ``CXR_COLLECTIVE_TIMEOUT_S`` overrides it.
COLLECTIVE_TIMEOUT_S = 600.0
#: Stated in the CLI help; written with the settings (cxr_core.core.settings), which also say why the learning
#: rate is not scaled with the replicas.
LEARNING_RATE_RULE = settings.LEARNING_RATE_RULE


class WorkerLostError(CxrError):
    """Another worker of a multi-worker run stopped answering."""


@dataclass
class Runtime:
    """The strategy of this process and the facts about it that a run records."""

    strategy: Any
    name: str = "default"                   # "default" | "MirroredStrategy" | "MultiWorkerMirroredStrategy"
    replicas: int = 1
    workers: int = 1
    worker_index: int = 0
    is_chief: bool = True
    devices: list[str] = field(default_factory=lambda: ["CPU:0"])
    device_kind: str = "CPU"
    precision: str = "float32"

    @property
    def distributed(self) -> bool:
        return self.name != "default"

    @property
    def multi_worker(self) -> bool:
        return self.name == "MultiWorkerMirroredStrategy"

    def global_batch(self, per_replica: int) -> int:
        return int(per_replica) * self.replicas

    def fields(self) -> dict:
        """The fields that say where the run trains (status.json and the "runtime" progress event)."""
        return {"host": this_host(), "devices": list(self.devices), "device_kind": self.device_kind,
                "strategy": self.name, "replicas": int(self.replicas), "workers": int(self.workers),
                "precision": self.precision}

    def scope(self):
        """Where models and optimisers that train under the strategy must be built."""
        return self.strategy.scope() if self.distributed else contextlib.nullcontext()

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any worker (a barrier too: every worker must call it, in step)."""
        if not self.multi_worker:
            return bool(flag)
        value = 1.0 if flag else 0.0
        per_replica = self.strategy.experimental_distribute_values_from_function(lambda _ctx: tf.constant(value))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)) > 0


def cluster_spec() -> tuple[dict, dict] | None:
    """(cluster, task) from ``TF_CONFIG``, or None when it is unset or names no cluster."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise BadSettingError(f"TF_CONFIG is not valid JSON ({error.msg}); see the README on multi-worker runs.") \
            from error
    if not isinstance(parsed, dict) or not isinstance(parsed.get("cluster"), dict):
        return None
    task = parsed.get("task") if isinstance(parsed.get("task"), dict) else {}
    return parsed["cluster"], task


def worker_role(cluster: dict, task: dict) -> tuple[int, int, bool]:
    """(this worker's index among chief + workers, how many there are, whether it is the chief).

    The chief is the "chief" task when the cluster has one, else worker 0 (TensorFlow's rule)."""
    chiefs = list(cluster.get("chief") or [])
    workers = list(cluster.get("worker") or [])
    kind, index = str(task.get("type", "worker")), int(task.get("index", 0) or 0)
    is_chief = kind == "chief" or (not chiefs and kind == "worker" and index == 0)
    position = index if kind == "chief" else len(chiefs) + index
    return position, len(chiefs) + len(workers), is_chief


def _short(device: str) -> str:
    """'/job:worker/replica:0/task:1/device:GPU:0' -> 'GPU:0'."""
    return device.rsplit("device:", 1)[-1] if "device:" in device else device.rsplit("/", 1)[-1]


def _split_cpu(tf, n: int) -> list[str]:
    """N logical CPU devices (before TensorFlow initialises its devices); their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as error:  # devices already initialised in this process
        if len(tf.config.list_logical_devices("CPU")) != n:
            raise BadSettingError(f"--cpu-replicas {n} must be chosen before TensorFlow starts in this process; "
                                  "run training in a new process.") from error
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _precision(tf, requested: str, gpus: list) -> str:
    if requested == "float32":
        return "float32"
    if not gpus:
        if requested == "mixed":
            raise BadSettingError("Mixed precision needs an NVIDIA GPU and this process trains on the CPU, where "
                                  "it would be slower; use --precision auto or float32.")
        return "float32"
    if requested == "mixed":
        return "mixed_float16"
    # auto: float16 pays off only from Volta (compute capability 7.0) on, with tensor cores; bfloat16
    # is never chosen by default (it trains less accurately without loss scaling for little gain here).
    capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability") for gpu in gpus]
    if all(c is not None and tuple(c) >= (7, 0) for c in capabilities):
        return "mixed_float16"
    return "float32"


def setup(distribute: str = "auto", precision: str = "auto", cpu_replicas: int = 0,
          timeout_s: float | None = None) -> Runtime:
    """Choose the strategy and the precision policy of this process (call it once, early).

    Raises:
        BadSettingError: an unknown or impossible choice, in one sentence.
    """
    if distribute not in DISTRIBUTE_MODES:
        raise BadSettingError(f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}; got {distribute!r}.")
    if precision not in PRECISIONS:
        raise BadSettingError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    cpu_replicas = int(cpu_replicas or 0)
    if cpu_replicas < 0 or cpu_replicas > 64:
        raise BadSettingError(f"--cpu-replicas must be between 0 and 64; got {cpu_replicas}.")
    if cpu_replicas > 1 and distribute in ("off", "multi-worker"):
        raise BadSettingError(f"--cpu-replicas splits this machine's CPU for --distribute mirrored (or auto), "
                              f"not for --distribute {distribute}.")
    cluster = cluster_spec() if distribute == "multi-worker" else None
    if distribute == "multi-worker" and cluster is None:
        raise BadSettingError("--distribute multi-worker needs the TF_CONFIG environment variable to name the "
                              "cluster and this worker's task, the same on every worker but for the task.")

    cpus = _split_cpu(tf, cpu_replicas) if cpu_replicas > 1 else None
    gpus = [] if cpus else tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Memory as needed, so two runs (or a run and the app's predictions) can share a GPU.
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)
    mode = distribute
    if mode == "auto":
        mode = "mirrored" if (cpus or len(gpus) > 1) else "off"

    workers, index, is_chief = 1, 0, True
    if mode == "multi-worker":
        index, workers, is_chief = worker_role(*cluster)
        timeout = timeout_s or float(os.environ.get("CXR_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S))
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        name = "MultiWorkerMirroredStrategy"
        devices = [_short(d) for d in strategy.extended.worker_devices]
    elif mode == "mirrored":
        chosen = cpus or [d.name for d in tf.config.list_logical_devices("GPU")] or ["/cpu:0"]
        strategy = tf.distribute.MirroredStrategy(devices=chosen)
        name = "MirroredStrategy"
        devices = [_short(d) for d in strategy.extended.worker_devices]
    else:
        strategy = tf.distribute.get_strategy()
        name = "default"
        devices = ["GPU:0"] if gpus else ["CPU:0"]
    kind = "GPU" if any(d.upper().startswith("GPU") for d in devices) else "CPU"
    policy = _precision(tf, precision, gpus if kind == "GPU" else [])
    keras.mixed_precision.set_global_policy(policy)
    return Runtime(strategy=strategy, name=name, replicas=int(strategy.num_replicas_in_sync), workers=workers,
                   worker_index=index, is_chief=is_chief, devices=devices, device_kind=kind, precision=policy)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is how TensorFlow reports a worker that died or a collective that timed out."""
    return isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                              tf.errors.CancelledError, tf.errors.AbortedError, tf.errors.InternalError,
                              tf.errors.UnknownError))


@contextlib.contextmanager
def collective_errors(runtime: Runtime | None) -> Iterator[None]:
    """In a multi-worker run, turn a lost worker (a collective that failed or timed out) into one sentence."""
    try:
        yield
    except Exception as error:
        if runtime is None or not runtime.multi_worker or not is_collective_failure(error):
            raise
        raise WorkerLostError(f"Another worker of this {runtime.workers}-worker run stopped answering "
                              f"({type(error).__name__}), so training stopped and no model was saved.") from error
