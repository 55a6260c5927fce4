"""Images streamed from disk for fine-tuning: a Keras PyDataset, and the same batches as a tf.data pipeline."""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from cxr_core.core.config import RunConfig
from cxr_core.data.augment import augment_image
from cxr_core.io.images import load_gray, to_model_input


class ImageBatches(keras.utils.PyDataset):
    """Batches decoded from disk in worker threads (never the whole set in memory)."""

    def __init__(self, rows: pd.DataFrame, config: RunConfig, batch_size: int, shuffle: bool = False,
                 online_augment: bool = False, with_labels: bool = True, weights: np.ndarray | None = None) -> None:
        super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)
        self.config, self.batch_size = config, batch_size
        self.shuffle, self.online_augment, self.with_labels = shuffle, online_augment, with_labels
        self.size = config.model.resolved_image_size
        self.paths = rows["path"].tolist()
        self.seeds = (rows["augment_seed"].fillna(-1).astype(int).tolist() if "augment_seed" in rows
                      else [-1] * len(rows))
        self.labels = rows["y"].to_numpy(dtype=np.float32)
        self.weights = weights
        self.order = np.arange(len(self.paths))
        self.epoch = 0
        self._shuffle()

    def _shuffle(self) -> None:
        self.order = self.epoch_order(self.epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of epoch counter ``epoch`` (drawn from the run's seed when shuffling)."""
        if not self.shuffle:
            return np.arange(len(self.paths))
        return np.random.default_rng(self.config.train.seed + epoch).permutation(len(self.paths))

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def image(self, i: int, epoch: int | None = None) -> np.ndarray:
        """The model input of row ``i`` (its stored augmentation, and the epoch's online one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        gray = load_gray(self.paths[i])
        if self.seeds[i] >= 0:
            gray = augment_image(gray, self.config.augment, self.seeds[i])
        if self.online_augment:
            seed = self.config.train.seed * 1_000_003 + epoch * 100_003 + int(i)
            gray = augment_image(gray, self.config.augment, seed)
        return to_model_input(gray, self.size)

    def load(self, positions) -> np.ndarray:
        """The model inputs of the rows at ``positions`` (decoded in threads), float32 (n, size, size, 3)."""
        if not len(positions):
            return np.zeros((0, self.size, self.size, 3), np.float32)
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            return np.stack(list(pool.map(self.image, [int(i) for i in positions]))).astype(np.float32)

    def __getitem__(self, index):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = np.stack([self.image(i) for i in chosen]).astype(np.float32)
        if not self.with_labels:
            return (batch,)
        if self.weights is not None:
            return batch, self.labels[chosen], self.weights[chosen]
        return batch, self.labels[chosen]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._shuffle()

    def training_dataset(self, epochs: int):
        """``epochs`` epochs of training batches as one tf.data pipeline: images decoded in parallel
        (``map`` with AUTOTUNE, in order) and prefetched, also across epoch boundaries. Measured on
        2 CPU cores (benchmarks/distribute.py) it delivers about 1.6 times the images per second of
        this PyDataset under ``fit``, so a fast device waits less for JPEG decoding.

        Epoch k has the order and online augmentation of epoch counter k + 1, the batches ``fit``
        gives a PyDataset (it calls ``on_epoch_end`` once before training). Use it with
        ``steps_per_epoch=len(self)``, so that ``fit`` keeps one iterator for all epochs.
        """
        n, size = len(self.paths), self.size
        plan = np.stack([np.stack([self.epoch_order(k + 1), np.full(n, k + 1)], axis=1) for k in range(epochs)])
        labels = tf.constant(self.labels)
        weights = tf.constant(self.weights, tf.float32) if self.weights is not None else None

        def decode(pair: np.ndarray) -> np.ndarray:
            return self.image(int(pair[0]), int(pair[1])).astype(np.float32, copy=False)

        def load(pair):
            image = tf.ensure_shape(tf.numpy_function(decode, [pair], tf.float32), (size, size, 3))
            row = pair[0]
            if weights is not None:
                return image, tf.gather(labels, row), tf.gather(weights, row)
            return image, tf.gather(labels, row)

        def epoch_batches(pairs):
            return (tf.data.Dataset.from_tensor_slices(pairs)
                    .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(self.batch_size))

        return (tf.data.Dataset.from_tensor_slices(plan.astype(np.int64)).flat_map(epoch_batches)
                .prefetch(tf.data.AUTOTUNE))
