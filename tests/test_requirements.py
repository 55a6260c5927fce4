"""requirements.txt picks the right TensorFlow build on each platform users run; requirements-gpu.txt is
the same list with TensorFlow's CUDA build on Linux x86-64."""
from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
    """The job lock and liveness (filelock, psutil) and the JPEG Lossless / JPEG-LS decoders are
    installed on every platform (each resolved to wheels there with pip download --platform)."""
    env = {"sys_platform": platform, "platform_machine": machine, "python_version": "3.12"}
    chosen = {r.name for r in _requirements() if r.marker is None or r.marker.evaluate(env)}
    assert {"filelock", "psutil", "pylibjpeg", "pylibjpeg-libjpeg", "pydicom"} <= chosen


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
