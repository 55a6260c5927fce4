"""requirements.txt picks the right TensorFlow build on each platform users run; requirements-gpu.txt is
the same list with TensorFlow's CUDA build on Linux x86-64; no runtime requirement is GPL-licensed, since
the project is Apache-2.0 and is forked and deployed by others."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
GPU_REQUIREMENTS = REQUIREMENTS.with_name("requirements-gpu.txt")


def _requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


@pytest.mark.parametrize("platform,machine,python,expected", [
    ("linux", "x86_64", "3.11", "tensorflow-cpu"),
    ("linux", "x86_64", "3.13", "tensorflow-cpu"),
    ("darwin", "arm64", "3.12", "tensorflow"),
    ("linux", "aarch64", "3.11", "tensorflow"),
    ("win32", "AMD64", "3.12", "tensorflow"),  # on Windows the same CPU build as tensorflow-cpu
])
def test_exactly_one_tensorflow_per_platform(platform, machine, python, expected):
    env = {"sys_platform": platform, "platform_machine": machine, "python_version": python}
    chosen = [r.name for r in _requirements()
              if r.name.startswith("tensorflow") and (r.marker is None or r.marker.evaluate(env))]
    assert chosen == [expected]


@pytest.mark.parametrize("path", [REQUIREMENTS, GPU_REQUIREMENTS], ids=["cpu", "gpu"])
def test_every_requirement_has_an_upper_bound(path):
    for requirement in _requirements(path):
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), requirement


@pytest.mark.parametrize("platform,machine,wanted", [
    ("linux", "x86_64", True), ("linux", "aarch64", True), ("darwin", "arm64", True),
    ("win32", "AMD64", True), ("darwin", "x86_64", False),  # no LiteRT wheel for Intel Macs
])
def test_litert_runtime_where_wheels_exist(platform, machine, wanted):
    env = {"sys_platform": platform, "platform_machine": machine, "python_version": "3.12"}
    chosen = [r for r in _requirements() if r.name == "ai-edge-litert"]
    assert len(chosen) == 1 and chosen[0].marker.evaluate(env) is wanted


@pytest.mark.parametrize("platform,machine", [
    ("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"), ("win32", "AMD64"),
])
def test_portable_jobs_and_compressed_dicom_everywhere(platform, machine):
    """The job lock and liveness (filelock, psutil) and the JPEG Lossless / JPEG-LS decoder (GDCM) are
    installed on every platform (each resolved to wheels there with pip download --platform)."""
    env = {"sys_platform": platform, "platform_machine": machine, "python_version": "3.12"}
    chosen = {r.name for r in _requirements() if r.marker is None or r.marker.evaluate(env)}
    assert {"filelock", "psutil", "python-gdcm", "pydicom"} <= chosen


@pytest.mark.parametrize("platform,machine,python,extras", [
    ("linux", "x86_64", "3.11", {"and-cuda"}),  # the CUDA build, with its libraries from pip
    ("linux", "x86_64", "3.13", {"and-cuda"}),
    ("linux", "aarch64", "3.12", set()),
    ("win32", "AMD64", "3.12", set()),  # no GPU build for native Windows after TensorFlow 2.10
    ("darwin", "arm64", "3.12", set()),
])
def test_gpu_file_selects_the_cuda_build_only_on_linux_x86_64(platform, machine, python, extras):
    env = {"sys_platform": platform, "platform_machine": machine, "python_version": python}
    chosen = [r for r in _requirements(GPU_REQUIREMENTS)
              if r.name.startswith("tensorflow") and (r.marker is None or r.marker.evaluate(env))]
    assert [(r.name, r.extras) for r in chosen] == [("tensorflow", extras)]


def test_gpu_file_installs_everything_else_requirements_txt_does():
    """requirements.txt must stay a plain list (pyproject.toml reads it), so the GPU file repeats it:
    the same requirements, ranges and markers, TensorFlow's range included."""
    def others(path):
        return {str(r) for r in _requirements(path) if not r.name.startswith("tensorflow")}

    def tensorflow_ranges(path):
        return {str(r.specifier) for r in _requirements(path) if r.name.startswith("tensorflow")}

    assert others(GPU_REQUIREMENTS) == others(REQUIREMENTS)
    assert tensorflow_ranges(GPU_REQUIREMENTS) == tensorflow_ranges(REQUIREMENTS)


# GPL and AGPL in an SPDX expression or a trove classifier; the LGPL (a library's licence) is allowed.
_GPL_SPDX = re.compile(r"(?<![\w-])A?GPL-")
_GPL_CLASSIFIER = re.compile(r"GNU (Affero )?General Public License")


def _gpl_licence(dist: metadata.Distribution) -> str | None:
    """The distribution's licence if it is GPL only, else None. The SPDX expression decides where there is
    one (one alternative of an OR that is not GPL suffices); then the trove classifiers; then a short
    License field (a long one is a whole licence text, often quoting the GPL of a bundled runtime)."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        alternatives = re.split(r"\s+OR\s+", expression.strip("() "))
        return expression if all(_GPL_SPDX.search(a) for a in alternatives) else None
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        gpl = [c for c in classifiers if _GPL_CLASSIFIER.search(c)]
        return "; ".join(gpl) or None
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) < 80 and re.search(r"(?<!L)GPL|General Public", field):
        return field
    return None


def _installed_runtime_distributions() -> dict[str, metadata.Distribution]:
    """Every installed distribution requirements.txt pulls in on this machine, through their own
    requirements (markers evaluated here, extras only where asked for)."""
    found: dict[str, metadata.Distribution] = {}
    pending = [(r, "") for r in _requirements()]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**default_environment(),
                                                                               "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (another platform's, or not yet installed)
        found[name] = dist
        for extra_name in [""] + sorted(requirement.extras):
            pending.extend((Requirement(line), extra_name) for line in dist.requires or [])
    return found


def test_the_gpl_check_recognises_gpl_licences():
    class Fake(metadata.Distribution):
        def __init__(self, **fields):
            self.fields = fields

        def read_text(self, filename):
            if filename != "METADATA":
                return None
            lines = []
            for key, value in self.fields.items():
                for item in value if isinstance(value, list) else [value]:
                    lines.append(f"{key.replace('_', '-')}: {item}")
            return "\n".join(lines) + "\n"

        def locate_file(self, path):
            return Path(path)

    classifier = "License :: OSI Approved :: "
    # pylibjpeg-libjpeg 2.x, as it declares itself:
    assert _gpl_licence(Fake(License="GPL V3.0", Classifier=[classifier + "GNU General Public License v3 (GPLv3)",
                                                             "License :: Other/Proprietary License"]))
    assert _gpl_licence(Fake(License_Expression="GPL-3.0-or-later"))
    assert _gpl_licence(Fake(License_Expression="AGPL-3.0-only"))
    assert _gpl_licence(Fake(License="GPLv2"))
    assert not _gpl_licence(Fake(License_Expression="LGPL-3.0-or-later"))
    assert not _gpl_licence(Fake(License_Expression="MIT OR GPL-2.0-only"))
    assert not _gpl_licence(Fake(License_Expression="Apache-2.0"))
    assert not _gpl_licence(Fake(Classifier=[classifier + "GNU Lesser General Public License v3 (LGPLv3)"]))
    assert not _gpl_licence(Fake(License="BSD-3-Clause"))


def test_no_installed_runtime_requirement_is_gpl():
    """Teachers fork and deploy the Apache-2.0 project: a GPL requirement would bind them to the GPL."""
    dists = _installed_runtime_distributions()
    if "pydicom" not in dists:
        pytest.skip("the runtime requirements are not installed here")
    gpl = {name: licence for name, dist in dists.items() if (licence := _gpl_licence(dist))}
    assert not gpl, gpl
