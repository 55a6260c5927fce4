"""Test-time augmentation: a few fixed views of each image; their logits averaged, their maps moved back.

A view is an affine change of the model's input: a shift of a few per cent or a small zoom in, the
framing differences between two hospitals' films (no flip: a mirrored chest is another anatomy). The
prediction is the mean of the views' logits. Every head here splits its logit over the image (the
predictor's docstring: ``logit = mean(S) + b`` with ``S`` the signed map), so the map that explains the
mean logit is the mean of the views' signed maps, each moved back into the original image's frame; a
part of the image a view did not see counts for nothing in that view. For a sigmoid head the two raw
channels are ReLU(S) and ReLU(-S), so ``S`` is their difference and the average is exact; for a softmax
head (and an ensemble's summed maps) the ReLU'd class maps are averaged the same way, an approximation.

Both engines run the views as one batch, so the cost is about ``len(VIEWS)`` times one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class View:
    """One fixed view: a shift (fractions of the side; + is right or down) and a scale (below 1 zooms in)."""

    name: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


#: The views, the original first. Shifts of 4 % and a 10 % zoom stay within what two hospitals' framing differs by.
VIEWS: tuple[View, ...] = (View("original"), View("shifted left", dx=-0.04), View("shifted right", dx=0.04),
                           View("zoomed in", scale=0.9))


def view_matrix(view: View, size: int) -> np.ndarray:
    """The 2x3 affine matrix taking a pixel of the view to the original image's pixel it shows."""
    centre = (size - 1) / 2.0
    s = float(view.scale)
    return np.array([[s, 0.0, centre * (1.0 - s) + view.dx * size],
                     [0.0, s, centre * (1.0 - s) + view.dy * size]], np.float64)


def make_views(batch: np.ndarray, views: tuple[View, ...] | None = None) -> np.ndarray:
    """(n, size, size, c) model inputs -> (n * len(views), size, size, c), each image's views together
    (``views``: ``VIEWS`` unless given)."""
    views = VIEWS if views is None else views
    batch = np.asarray(batch, np.float32)
    size = batch.shape[1]
    out = np.empty((len(batch) * len(views), *batch.shape[1:]), np.float32)
    for i, image in enumerate(batch):
        for j, view in enumerate(views):
            if view == View(view.name):  # the original: no resampling
                out[i * len(views) + j] = image
                continue
            moved = cv2.warpAffine(image, view_matrix(view, size), (size, size),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
            out[i * len(views) + j] = moved.reshape(image.shape)
    return out


def mean_logits(logits: np.ndarray, n_views: int) -> np.ndarray:
    """(n * n_views, k) -> (n, k): each image's mean over its views."""
    logits = np.asarray(logits, np.float32)
    return logits.reshape(-1, n_views, logits.shape[-1]).mean(axis=1)


def aligned_maps(cams: np.ndarray, size: int, signed: bool, views: tuple[View, ...] | None = None) -> np.ndarray:
    """Raw maps of every view (n * len(views), h', w', channels) -> each image's mean map in its own frame,
    (n, size, size, channels) at the input's resolution.

    Args:
        signed: the two channels are ReLU(S) and ReLU(-S) of one logit (a sigmoid head): average S itself.
    """
    views = VIEWS if views is None else views
    cams = np.asarray(cams, np.float32)
    n_views = len(views)
    channels = cams.shape[-1]
    out = np.zeros((len(cams) // n_views, size, size, channels), np.float32)
    for i in range(len(out)):
        total = np.zeros((size, size, 1 if signed else channels), np.float32)
        seen = np.zeros((size, size, 1), np.float32)
        for j, view in enumerate(views):
            raw = cams[i * n_views + j]
            part = (raw[..., 0] - raw[..., 1])[..., None] if signed else raw
            up = cv2.resize(part, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, -1)
            back = cv2.invertAffineTransform(view_matrix(view, size))
            # dst(y) = up(back . y): the view's map at the view pixel that showed original pixel y.
            moved = cv2.warpAffine(up, back, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0.0).reshape(size, size, -1)
            mask = cv2.warpAffine(np.ones((size, size), np.float32), back, (size, size),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0.0)[..., None]
            total += moved * mask
            seen += mask
        mean = total / np.maximum(seen, 1e-6)
        out[i] = np.concatenate([np.maximum(mean, 0.0), np.maximum(-mean, 0.0)], axis=-1) if signed \
            else np.maximum(mean, 0.0)
    return out
