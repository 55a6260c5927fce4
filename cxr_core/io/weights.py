"""Where a backbone's starting weights come from, checked before any work starts (no TensorFlow here).

Three sources: ``imagenet`` (Keras downloads the file once into its cache, ``$KERAS_HOME/models``,
else ``~/.keras/models``), ``none`` (random initialisation) or a weights file the user placed in the
weights folder (``$CXR_WEIGHTS_DIR``, else ``./weights``). Without internet the ImageNet choice used
to fail ten seconds into a run with Keras' "URL fetch failure"; ``check_weights`` says before the run
starts, in one sentence, what to do instead.
"""
from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cxr_core.core.backbones import BACKBONES, get_backbone
from cxr_core.core.errors import BadSettingError
from cxr_core.io.atomic import write_stream_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Where Keras downloads ImageNet weights from (all four backbones' files live under this host).
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: Seconds the reachability probe waits: long enough for a slow network, short enough for a page.
PROBE_TIMEOUT_S = 4.0
#: HDF5's signature: every Keras weights file (*.h5, *.weights.h5) starts with it.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: MobileNetV2 weights fit one width only; Keras' and our file names carry it (``..._0.35_...``).
_ALPHA_IN_NAME = re.compile(r"(?:^|_)(0\.35|0\.5|0\.75|1\.0|1\.3|1\.4)_")


def keras_cache_dir() -> Path:
    """The folder Keras keeps downloaded application weights in (its own rule, without importing it)."""
    if os.environ.get("KERAS_HOME"):
        base = Path(os.environ["KERAS_HOME"])
    else:
        home = Path.home()
        base = (home if os.access(home, os.W_OK) else Path(tempfile.gettempdir())) / ".keras"
    return base.expanduser() / "models"


def weights_dirs() -> list[Path]:
    """Folders searched for weights files a user placed: ``$CXR_WEIGHTS_DIR`` first, then ``./weights``."""
    folders = []
    if os.environ.get("CXR_WEIGHTS_DIR"):
        folders.append(Path(os.environ["CXR_WEIGHTS_DIR"]).expanduser())
    folders.append(PROJECT_ROOT / "weights")
    return folders


def upload_dir() -> Path:
    """Where an uploaded weights file is kept: the first weights folder."""
    return weights_dirs()[0]


@dataclass(frozen=True)
class WeightsFile:
    """A weights file found on this machine."""

    path: Path
    source: str               # "weights folder" | "Keras cache"
    backbone: str | None      # the backbone its name says it is for, if any
    alpha: float | None       # MobileNetV2's width, when the name carries it

    @property
    def label(self) -> str:
        return f"File: {self.path.name} ({self.source})"


def backbone_of(name: str) -> str | None:
    """The backbone a file name says it is for (``mobilenet_v2_...``, ``inception_v3_...``), else None."""
    lowered = name.lower().replace("-", "_")
    for key, spec in BACKBONES.items():
        stem = spec.imagenet_file.split("_weights")[0].split("_notop")[0].split("{")[0].rstrip("_")
        if lowered.startswith(key) or lowered.startswith(stem):
            return key
    return None


def alpha_of(name: str) -> float | None:
    match = _ALPHA_IN_NAME.search(name)
    return float(match.group(1)) if match else None


def find_weight_files() -> list[WeightsFile]:
    """Every ``*.h5`` file in the weights folders and in Keras' cache, weights folders first."""
    found: list[WeightsFile] = []
    seen: set[Path] = set()
    sources = [(folder, "weights folder") for folder in weights_dirs()] + [(keras_cache_dir(), "Keras cache")]
    for folder, source in sources:
        if not folder.is_dir():
            continue
        try:
            paths = sorted(p for p in folder.rglob("*.h5") if p.is_file() and not p.name.startswith("."))
        except OSError:
            continue
        for path in paths:
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                found.append(WeightsFile(path, source, backbone_of(path.name), alpha_of(path.name)))
    return found


def cached_imagenet(backbone: str, alpha: float = 1.0, image_size: int | None = None) -> Path | None:
    """Keras' cached ImageNet file for this backbone (what ``weights="imagenet"`` loads), if present."""
    spec = get_backbone(backbone)
    path = keras_cache_dir() / spec.imagenet_filename(alpha, image_size)
    return path if path.is_file() and path.stat().st_size > 0 else None


def reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the ImageNet download host answers (any HTTP answer counts: the network is there).

    ``$CXR_IMAGENET_URL`` overrides the address probed (a test points it at a closed local port).
    """
    url = url or os.environ.get("CXR_IMAGENET_URL") or IMAGENET_URL
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the host answered (403/404 for a folder address): the download can work
    except (urllib.error.URLError, OSError, ValueError):
        return False


#: The other ways to start, as the command line, the Training page and a hosted app's visitor (who
#: cannot add files to the server, and is not shown its folders) spell them.
OTHER_WAYS = {
    "cli": "choose a weights file (--weights PATH), or train from scratch (--weights none --fine-tune-layers -1)",
    "app": "choose or upload a weights file, or train from scratch (weights None, fine-tune all layers)",
    "visitor": "choose a weights file offered here, or train from scratch (weights None, fine-tune all layers)",
}


def imagenet_help(backbone: str, alpha: float = 1.0, image_size: int | None = None, audience: str = "cli") -> str:
    """Part of one sentence: the file to place and where, or the other two ways to start, as
    ``audience`` (a key of ``OTHER_WAYS``: who asks) can take them."""
    spec = get_backbone(backbone)
    if audience == "visitor":
        return (f"ask the operator of this app to add {spec.imagenet_filename(alpha, image_size)} to the server, "
                f"{OTHER_WAYS[audience]}")
    return f"place {spec.imagenet_filename(alpha, image_size)} in {keras_cache_dir()}, {OTHER_WAYS[audience]}"


def check_weights(backbone: str, weights: str, alpha: float = 1.0, image_size: int | None = None,
                  probe=reachable, audience: str = "cli") -> str:
    """Check before a run starts that its starting weights can be had; return how they will be had.

    Returns:
        "cached" (ImageNet file already in Keras' cache), "download" (the host answers), "file"
        or "none".

    Raises:
        BadSettingError: one sentence saying what to do, when ImageNet weights are neither cached nor
            reachable, or the weights file does not exist or is not a Keras weights file.
    """
    spec = get_backbone(backbone)
    choice = (weights or "none").strip()
    if choice.lower() == "none":
        return "none"
    if choice.lower() == "imagenet":
        if cached_imagenet(backbone, alpha, image_size) is not None:
            return "cached"
        if probe():
            return "download"
        raise BadSettingError(
            f"The ImageNet weights for {spec.label} are not on this machine and the download server cannot be "
            f"reached; {imagenet_help(backbone, alpha, image_size, audience)}.")
    path = Path(choice).expanduser()
    if not path.is_file():
        raise BadSettingError(f"The weights file {path} does not exist; pass imagenet, none or an existing .h5 file.")
    if not is_hdf5(path):
        raise BadSettingError(f"{path.name} is not a Keras weights file (HDF5, *.h5); choose another file.")
    return "file"


def is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def save_upload(name: str, stream, folder: Path | None = None, chunk: int = 1 << 20) -> Path:
    """Keep an uploaded weights file in the weights folder (atomically); return its path.

    ``stream`` is a binary file object (Streamlit's UploadedFile). The name is reduced to its last
    part, so an upload cannot write outside the folder.

    Raises:
        BadSettingError: the name does not end in .h5 or the content is not HDF5.
    """
    base = Path(str(name).replace("\\", "/")).name
    if not base.lower().endswith(".h5") or base.startswith("."):
        raise BadSettingError(f"{base or 'The file'} is not a Keras weights file; its name must end in .h5.")
    head = stream.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise BadSettingError(f"{base} is not a Keras weights file (its content is not HDF5).")
    target = (folder or upload_dir()) / base
    write_stream_atomic(target, stream, head=head, chunk=chunk)
    return target
