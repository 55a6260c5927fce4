"""Cached backbone features: the frozen backbone runs once per image, ever.

With a frozen base, training the head only needs each image's pooled features, so they are
computed once and kept on disk. An entry is keyed by everything that changes it:

    cache_dir/<model_key>/<2-char prefix>/<entry_key>.npy      one float32 vector (D,)
    cache_dir/<model_key>/packs/<hash of the entry keys>.npz     all vectors of one row list


``model_key`` covers the backbone, the weights (ImageNet, a file's sha256, or the seed of a random
initialisation), the input size, alpha and the resizing; ``entry_key`` is the image's sha256, or for
an augmented row a hash of the image's sha256, the augmentation settings and the row's augment_seed.
Entries are written atomically; a damaged or wrong-shape entry is noticed on reading and recomputed.
A pack holds the features of a whole row list in one file, so a rerun on the same data (a warm
run) reads one file instead of thousands; it is only a faster copy of the entries.

Several workers of a multi-worker run share one cache: each computes its shard of the missing
entries (``shard=``), then every worker reads them all.

Throughput: images are decoded and resized in threads (OpenCV and Pillow release the GIL) while
the model runs the previous batch through one compiled function, and cache writes happen on a
writer thread, so the model, not the pipeline, sets the pace.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import tensorflow as tf

from cxr_core.core.backbones import get_backbone
from cxr_core.core.config import AugmentConfig, ModelConfig
from cxr_core.core.errors import CxrError
from cxr_core.data.augment import augment_image, params_key
from cxr_core.engine.model import build_backbone, build_feature_extractor
from cxr_core.io import atomic
from cxr_core.io.hashing import file_sha256
from cxr_core.io.images import load_gray, to_model_input

log = logging.getLogger(__name__)

# Bump when anything that changes the features but is not in the key changes (e.g. the resizing).
CACHE_VERSION = 1
_RESIZE = "cv2.INTER_AREA-gray3"
_META = "meta.json"
_PACKS = "packs"
_PACKS_KEPT = 4  # per model: the row lists used most recently

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
#: Told when the model starts computing what the cache lacks, with how many rows: the look-ups before
#: are fast, so a time estimate should count from here.
ComputeFn = Callable[[int], None]


@dataclass
class FeatureResult:
    """Features of the rows that could be read.

    Attributes:
        features: float32 (n_ok, D), in the order of ``index``.
        index: positions (``rows.iloc``) of the rows kept, ascending.
        errors: DataFrame(path, reason) of the rows left out (unreadable images).
        n_cached: rows whose features came from the cache.
        n_computed: rows whose features were computed now.
        cancelled: ``should_stop`` ended the run early (features cover only the rows done).
        rows: the kept rows themselves (``rows.iloc[index]``).
        backbone: the backbone model when one was built (reuse it for the classifier), else None.
        model_key: the cache folder name of this model.
    """

    features: np.ndarray
    index: np.ndarray
    errors: pd.DataFrame
    n_cached: int
    n_computed: int
    cancelled: bool = False
    rows: pd.DataFrame | None = None
    backbone: object | None = None
    model_key: str = ""
    feature_dim: int = 0


def default_cache_dir() -> Path:
    """``$CXR_CACHE_DIR``, else ``~/.cache/cxr-workbench/features``."""
    env = os.environ.get("CXR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cxr-workbench" / "features"


def model_key_parts(model_cfg: ModelConfig, seed: int) -> dict:
    """What identifies the feature extractor's output (the basis of ``model_key``)."""
    spec = get_backbone(model_cfg.backbone)
    weights = (model_cfg.weights or "none").strip()
    if weights.lower() == "imagenet":
        identity = "imagenet"
    elif weights.lower() == "none":
        # A random initialisation is fixed by the seed (build_backbone seeds Keras globally).
        identity = f"none:seed={int(seed)}"
    else:
        try:
            identity = "sha256:" + file_sha256(Path(weights).expanduser())
        except OSError:
            identity = "missing:" + weights  # build_backbone will raise the proper error
    parts = {
        "version": CACHE_VERSION,
        "backbone": spec.name,
        "weights": identity,
        "image_size": model_cfg.resolved_image_size,
        "alpha": float(model_cfg.alpha) if spec.supports_alpha else None,
        "resize": _RESIZE,
    }
    # A mixed precision policy (a GPU run) computes slightly different features: a key of its own,
    # added only then so that float32 keys, and the caches made before, stay as they were.
    keras = sys.modules.get("keras")  # not imported here: when Keras is not loaded, nothing set a policy
    policy = keras.mixed_precision.global_policy().name if keras is not None else "float32"
    if policy != "float32":
        parts["precision"] = policy
    return parts


def model_key(model_cfg: ModelConfig, seed: int) -> str:
    """Folder name of this model's cache entries: readable prefix plus a hash of ``model_key_parts``."""
    parts = model_key_parts(model_cfg, seed)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return f"{parts['backbone']}-{parts['image_size']}-{digest}"


def entry_key(image_sha256: str, augment_seed: int, augment_cfg: AugmentConfig | None) -> str:
    """Cache entry name: the image's sha256, or for an augmented row a hash with its settings and seed."""
    if augment_seed < 0:
        return image_sha256
    if augment_cfg is None:
        raise ValueError("augmented rows (augment_seed >= 0) need an augment_cfg.")
    text = f"{image_sha256}|{params_key(augment_cfg)}|{int(augment_seed)}"
    return hashlib.sha256(text.encode()).hexdigest()


def _entry_path(model_dir: Path, key: str) -> Path:
    return model_dir / key[:2] / f"{key}.npy"


def _read_entry(path: Path, dim: int) -> np.ndarray | None:
    """The cached vector, or None when absent, damaged or of the wrong shape."""
    try:
        vec = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as error:
        log.info("damaged cache entry %s (%s); recomputing", path.name, error)
        return None
    if vec.shape != (dim,) or vec.dtype != np.float32 or not np.isfinite(vec).all():
        log.info("cache entry %s has shape %s dtype %s; recomputing", path.name, vec.shape, vec.dtype)
        return None
    return vec


def _write_entry(path: Path, vec: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(vec, dtype=np.float32), allow_pickle=False)


class _Writer:
    """Writes cache entries on one background thread; a failing disk only loses the cache."""

    def __init__(self) -> None:
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="cxr-cache-write")
        self._futures: list[cf.Future] = []
        self.failed = False

    def submit(self, path: Path, vec: np.ndarray) -> None:
        if not self.failed:
            self._futures.append(self._pool.submit(_write_entry, path, vec.copy()))

    def close(self) -> None:
        for future in self._futures:
            try:
                future.result()
            except OSError as error:
                if not self.failed:
                    log.warning("cannot write the feature cache (%s); features are kept in memory only", error)
                self.failed = True
        self._pool.shutdown(wait=True)


def _prepare_rows(rows: pd.DataFrame) -> tuple[list[str], list[str | None], list[int]]:
    if "path" not in rows.columns:
        raise ValueError("rows need a path column.")
    paths = [str(p) for p in rows["path"].tolist()]
    if "sha256" in rows.columns:
        shas = [s if isinstance(s, str) and len(s) == 64 else None for s in rows["sha256"].tolist()]
    else:
        shas = [None] * len(paths)
    if "augment_seed" in rows.columns:
        seeds = [int(s) for s in pd.to_numeric(rows["augment_seed"], errors="coerce").fillna(-1).tolist()]
    else:
        seeds = [-1] * len(paths)
    return paths, shas, seeds


class FeatureCache:
    """One model's cache entries on disk: ``<cache_dir>/<model_key>/`` with its entries, packs and meta.

    ``dim`` is the feature length once known (from meta.json, or set by ``learn_dim`` when the model
    first runs); entries are read only when it is known. Writes go through one background ``_Writer``:
    a failing disk loses the cache, never the features.
    """

    def __init__(self, model_cfg: ModelConfig, seed: int, cache_dir: str | os.PathLike | None = None) -> None:
        self.model_cfg, self.seed = model_cfg, seed
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.key = model_key(model_cfg, seed)
        self.folder = root / self.key
        if self.folder.is_dir():
            atomic.sweep_stale_temps(self.folder)  # leftovers of a process killed mid-write
        meta = atomic.read_json(self.folder / _META, default=None)
        known = isinstance(meta, dict) and isinstance(meta.get("feature_dim"), int)
        self.dim = int(meta["feature_dim"]) if known else 0
        self.writer = _Writer()

    def entry_path(self, key: str) -> Path:
        return _entry_path(self.folder, key)

    def read(self, path: Path) -> np.ndarray | None:
        return _read_entry(path, self.dim) if self.dim else None

    def write(self, path: Path, vec: np.ndarray) -> None:
        self.writer.submit(path, vec)

    def learn_dim(self, dim: int) -> None:
        """The model's feature length: recorded in meta.json when it differs from what the cache held."""
        if dim != self.dim:
            self.dim = dim
            _write_meta(self.folder, self.model_cfg, self.seed, dim, self.writer)

    def read_pack(self, keys: list[str] | None) -> np.ndarray | None:
        return _read_pack(_pack_path(self.folder, keys), keys, self.dim) if keys and self.dim else None

    def write_pack(self, keys: list[str], features: np.ndarray, *, replace: bool) -> None:
        _write_pack(_pack_path(self.folder, keys), keys, features, replace=replace)

    def close(self) -> None:
        self.writer.close()

    @property
    def failed(self) -> bool:
        return self.writer.failed


class _Extraction:
    """One pass over a row list: look every row up in the cache, then run the model on the misses,
    loading batch N+1 on a thread while batch N runs."""

    def __init__(self, rows: pd.DataFrame, cache: FeatureCache, augment_cfg: AugmentConfig | None, *,
                 batch_size: int, workers: int, progress: ProgressFn, stop: StopFn,
                 on_compute: ComputeFn | None = None) -> None:
        self.paths, self.shas, self.aug_seeds = _prepare_rows(rows)
        if augment_cfg is None and any(s >= 0 for s in self.aug_seeds):
            raise ValueError("rows with augment_seed >= 0 need an augment_cfg to make their augmented images.")
        self.cache, self.augment_cfg = cache, augment_cfg
        self.size = cache.model_cfg.resolved_image_size
        self.batch_size, self.progress, self.stop = batch_size, progress, stop
        self.on_compute = on_compute
        self.total = len(self.paths)
        self.vectors: dict[int, np.ndarray] = {}
        self.errors: list[tuple[int, str, str]] = []
        self.entry_paths: list[Path | None] = [None] * self.total
        self.n_cached = self.n_computed = self.done = 0
        self.cancelled = False
        self.backbone = None
        self.pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="cxr-features")
        self.prefetch = cf.ThreadPoolExecutor(1, thread_name_prefix="cxr-prefetch")

    def keys(self) -> list[str] | None:
        """Every row's entry key, or None while some image's hash is unknown."""
        if any(sha is None for sha in self.shas):
            return None
        return [entry_key(sha, seed, self.augment_cfg) for sha, seed in zip(self.shas, self.aug_seeds)]

    def _lookup(self, pos: int) -> tuple[int, np.ndarray | None, str | None]:
        """Key the row (hashing the file when needed) and read its entry; (pos, vector, error)."""
        if self.shas[pos] is None:
            try:
                self.shas[pos] = file_sha256(self.paths[pos])
            except OSError as error:
                return pos, None, f"The file cannot be read ({error.strerror or error})."
        key = entry_key(self.shas[pos], self.aug_seeds[pos], self.augment_cfg)
        self.entry_paths[pos] = self.cache.entry_path(key)
        return pos, self.cache.read(self.entry_paths[pos]), None

    def _load_image(self, pos: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            gray = load_gray(self.paths[pos])
            if self.aug_seeds[pos] >= 0:
                gray = augment_image(gray, self.augment_cfg, self.aug_seeds[pos])
            return pos, to_model_input(gray, self.size), None
        except CxrError as error:
            return pos, None, str(error)

    def _load_batch(self, positions: list[int]) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
        batch = np.empty((len(positions), self.size, self.size, 3), np.float32)
        kept: list[int] = []
        failed: list[tuple[int, str]] = []
        for pos, image, error in self.pool.map(self._load_image, positions):
            if image is None:
                failed.append((pos, error or "unreadable"))
            else:
                batch[len(kept)] = image
                kept.append(pos)
        return kept, batch[: len(kept)], failed

    def look_up(self) -> list[int]:
        """Phase 1: keys and cache look-ups, a batch at a time so progress moves and stop is honoured;
        returns the rows the cache lacks."""
        misses: list[int] = []
        for start in range(0, self.total, self.batch_size):
            if self.stop():
                self.cancelled = True
                break
            chunk = range(start, min(start + self.batch_size, self.total))
            for pos, vec, error in self.pool.map(self._lookup, chunk):
                if error is not None:
                    self.errors.append((pos, self.paths[pos], error))
                    self.done += 1
                elif vec is not None:
                    self.vectors[pos] = vec
                    self.n_cached += 1
                    self.done += 1
                else:
                    misses.append(pos)
            if self.done:
                self.progress(self.done, self.total)
        return misses

    def compute(self, misses: list[int]) -> None:
        """Phase 2: run the model on the misses and write their entries."""
        batches = [misses[i : i + self.batch_size] for i in range(0, len(misses), self.batch_size)]
        if self.on_compute is not None:
            self.on_compute(len(misses))
        # Always compiled: eager calls of a large backbone (InceptionV3) keep every intermediate tensor and
        # peaked at over 5 GB on 60 images; compiling costs about a second once.
        extractor, self.backbone, predict = _make_extractor(self.cache.model_cfg, self.cache.seed, self.size)
        self.cache.learn_dim(int(extractor.output.shape[-1]))
        pending = self.prefetch.submit(self._load_batch, batches[0])
        for number in range(len(batches)):
            kept, images, failed = pending.result()
            if number + 1 < len(batches):
                pending = self.prefetch.submit(self._load_batch, batches[number + 1])
            if kept:
                for pos, vec in zip(kept, predict(images)):
                    self.vectors[pos] = vec
                    self.cache.write(self.entry_paths[pos], vec)
                self.n_computed += len(kept)
            self.errors.extend((pos, self.paths[pos], error) for pos, error in failed)
            self.done += len(kept) + len(failed)
            self.progress(self.done, self.total)
            if number + 1 < len(batches) and self.stop():
                self.cancelled = True
                break

    def close(self) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True)
        self.cache.close()

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """(index of the rows kept, their features in that order)."""
        index = np.array(sorted(self.vectors), dtype=np.int64)
        features = np.zeros((len(index), self.cache.dim), np.float32)
        for i, pos in enumerate(index):
            features[i] = self.vectors[int(pos)]
        return index, features


def extract_features(
    rows: pd.DataFrame,
    model_cfg: ModelConfig,
    augment_cfg: AugmentConfig | None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    seed: int = 123,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    on_compute: ComputeFn | None = None,
) -> FeatureResult:
    """Pooled backbone features of every readable row, from the cache where possible.

    Args:
        rows: needs ``path``; ``sha256`` (computed when missing) and ``augment_seed`` (-1 = original;
            >= 0: ``augment_image(gray, augment_cfg, augment_seed)`` before resizing) are used when present.
        model_cfg: the backbone, weights, size and alpha.
        augment_cfg: the augmentation of rows with ``augment_seed`` >= 0 (may be None when there are none).
        cache_dir: the cache root; ``None`` for ``default_cache_dir()``.
        batch_size: images per model call.
        seed: seed of a random initialisation (``weights="none"``); part of the cache key then.
        on_progress: called with (rows done, rows in total) after every batch, cached ones included.
        should_stop: checked between batches; when it returns True the function returns at once
            with ``cancelled=True``.
        workers: decoding threads (default: the number of CPUs, at most 8).
        shard: (this worker's index, number of workers) in a multi-worker run: compute only every
            n-th image missing from the cache (the others compute the rest into the same cache), so
            the result holds the cached rows and this shard's; call again, after every worker is
            done, for all rows.
        on_compute: called with the number of rows to compute, once, before the model is built
            (not called when the cache holds every row).

    Returns:
        A ``FeatureResult``. Unreadable images are listed in ``errors`` and left out of ``index``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    cache = FeatureCache(model_cfg, seed, cache_dir)
    run = _Extraction(rows, cache, augment_cfg, batch_size=batch_size,
                      workers=workers or max(1, min(8, os.cpu_count() or 1)),
                      progress=on_progress or (lambda _done, _total: None), stop=should_stop or (lambda: False),
                      on_compute=on_compute)
    # The whole row list in one read when a previous run packed it (keys need every image's hash).
    keys = run.keys()
    packed = cache.read_pack(keys)
    if packed is not None:
        run.close()
        run.progress(run.total, run.total)
        log.info("features %s: %d from one pack", cache.key, run.total)
        return FeatureResult(features=packed, index=np.arange(run.total, dtype=np.int64),
                             errors=pd.DataFrame(columns=["path", "reason"]), n_cached=run.total, n_computed=0,
                             rows=rows, model_key=cache.key, feature_dim=cache.dim)
    pack_was_looked_for = bool(keys and cache.dim)
    try:
        misses = run.look_up()
        if shard is not None:
            misses = misses[shard[0]::shard[1]]
        if misses and not run.cancelled:
            run.compute(misses)
    finally:
        run.close()
    index, features = run.features()
    if not run.cancelled and not run.errors and run.total and cache.dim and not cache.failed and shard is None:
        # Rewritten when a pack was looked for and could not be used (it was damaged); else only when absent.
        cache.write_pack(keys or run.keys(), features, replace=pack_was_looked_for)
    run.errors.sort()
    error_frame = pd.DataFrame([(p, r) for _, p, r in run.errors], columns=["path", "reason"])
    log.info("features %s: %d cached, %d computed, %d unreadable%s", cache.key, run.n_cached, run.n_computed,
             len(run.errors), " (cancelled)" if run.cancelled else "")
    return FeatureResult(features=features, index=index, errors=error_frame, n_cached=run.n_cached,
                         n_computed=run.n_computed, cancelled=run.cancelled, rows=rows.iloc[index],
                         backbone=run.backbone, model_key=cache.key, feature_dim=cache.dim)


def _pack_path(model_dir: Path, keys: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:40]
    return model_dir / _PACKS / f"{digest}.npz"


def _read_pack(path: Path, keys: list[str], dim: int) -> np.ndarray | None:
    """The packed features of exactly ``keys`` (in order), or None when absent or not trustworthy."""
    try:
        with np.load(path, allow_pickle=False) as pack:
            packed_keys, features = pack["keys"], pack["features"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # damaged: the entries remain
        log.info("damaged feature pack %s (%s); reading the entries", path.name, error)
        return None
    if (features.shape != (len(keys), dim) or features.dtype != np.float32 or packed_keys.tolist() != keys
            or not np.isfinite(features).all()):
        log.info("feature pack %s does not match its rows; reading the entries", path.name)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used: kept when old packs are pruned
    return features


def _write_pack(path: Path, keys: list[str], features: np.ndarray, replace: bool = False) -> None:
    """Pack a row list's features (best effort: the entries stay the truth) and prune old packs."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if replace or not path.is_file():
            with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, keys=np.array(keys), features=np.ascontiguousarray(features, np.float32))
        packs = sorted(path.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in packs[_PACKS_KEPT:]:
            old.unlink(missing_ok=True)
    except OSError as error:
        log.info("cannot write the feature pack %s (%s); the entries are enough", path, error)


def _write_meta(model_dir: Path, model_cfg: ModelConfig, seed: int, dim: int, writer: _Writer) -> None:
    meta = {"feature_dim": dim, "key": model_key_parts(model_cfg, seed)}
    try:
        atomic.write_json_atomic(model_dir / _META, meta)
    except OSError as error:
        log.warning("cannot write the feature cache in %s (%s); features are kept in memory only", model_dir, error)
        writer.failed = True


def _make_extractor(model_cfg: ModelConfig, seed: int, size: int):
    """Build the frozen extractor and its inference function.

    The function is compiled: one traced graph for any batch size (tracing costs about a second,
    then each call is cheaper than ``model.predict``'s per-call set-up; eager InceptionV3 also
    peaked at 5 GB).
    """
    backbone = build_backbone(model_cfg, seed)
    extractor = build_feature_extractor(model_cfg, seed, backbone=backbone)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def run(images):
        return extractor(images, training=False)

    def predict(images: np.ndarray) -> np.ndarray:
        return run(tf.convert_to_tensor(images)).numpy().astype(np.float32, copy=False)

    return extractor, backbone, predict
