"""The server's memory limit (cgroup v2, v1, none), the upload limit sized from it, the upload spool
and the one-unpack-at-a-time slot."""
from __future__ import annotations

import io
import os
import threading

import psutil
import pytest

from cxr_core.core.errors import BadSettingError, ServerBusyError
from cxr_core.hosting import resources

MB = resources.MB
PHYSICAL = psutil.virtual_memory().total


def fake_cgroup(tmp_path, files: dict[str, str], proc: str) -> tuple:
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    proc_file = tmp_path / "proc-self-cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_limit_of_this_process_group_is_read(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"memory.max": "max", "app/web/memory.max": str(690 * MB)}, "0::/app/web\n")
    assert resources.memory_limit_bytes(root, proc) == 690 * MB


def test_cgroup_v2_parent_limit_applies_and_max_means_none(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"app/memory.max": str(1024 * MB), "app/web/memory.max": "max"},
                             "0::/app/web\n")
    assert resources.memory_limit_bytes(root, proc) == 1024 * MB


def test_cgroup_v1_limit_is_read_and_its_no_limit_number_ignored(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712",
                                        "memory/docker/abc/memory.limit_in_bytes": str(512 * MB)},
                             "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert resources.memory_limit_bytes(root, proc) == 512 * MB


def test_without_cgroups_the_machine_memory_is_the_limit(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"memory.max": "max"}, "0::/\n")
    assert resources.memory_limit_bytes(root, proc) == PHYSICAL
    assert resources.memory_limit_bytes(tmp_path / "nowhere", tmp_path / "no-proc-file") == PHYSICAL


def test_a_cgroup_limit_above_the_machine_memory_is_ignored(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"memory.max": str(PHYSICAL * 4)}, "0::/\n")
    assert resources.memory_limit_bytes(root, proc) == PHYSICAL


def test_upload_limit_leaves_room_for_the_app_and_two_uploads():
    # The smallest hosted size: 690 MB for everything.
    assert resources.upload_limit_mb(690 * MB, env={}) == (690 - 400) // 4 == 72
    assert resources.upload_limit_mb(64 * 2**30, server_max_mb=1024, env={}) == 1024
    assert resources.upload_limit_mb(300 * MB, env={}) == resources.MIN_UPLOAD_MB


def test_environment_overrides_the_upload_limit_up_to_the_server_cap():
    assert resources.upload_limit_mb(690 * MB, env={"CXR_MAX_UPLOAD_MB": "500"}) == 500
    assert resources.upload_limit_mb(690 * MB, server_max_mb=200, env={"CXR_MAX_UPLOAD_MB": "500"}) == 200
    with pytest.raises(BadSettingError) as caught:
        resources.upload_limit_mb(690 * MB, env={"CXR_MAX_UPLOAD_MB": "lots"})
    assert str(caught.value) == (
        "CXR_MAX_UPLOAD_MB must be a whole number of megabytes above 0, not 'lots'; fix or unset it.")


def test_save_upload_writes_the_bytes_to_the_spool_and_sweeps_old_ones(tmp_path):
    old = resources.spool_folder(tmp_path) / "old.zip"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    source = io.BytesIO(b"PK" + bytes(range(256)) * 9000)
    source.read(10)  # a reader left mid-way still gives the whole upload
    path = resources.save_upload(source, tmp_path)
    assert path.parent == resources.spool_folder(tmp_path) and path.suffix == ".zip"
    assert path.read_bytes() == source.getvalue()
    assert not old.exists()
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]  # no temp file


def test_only_one_archive_is_unpacked_at_a_time(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def first() -> None:
        with resources.unpack_slot(tmp_path):
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert entered.wait(10)
        with pytest.raises(ServerBusyError) as caught, resources.unpack_slot(tmp_path):
            pass
        assert str(caught.value) == "Another archive is being unpacked on this server; try again when it has finished."
    finally:
        release.set()
        worker.join()
    with resources.unpack_slot(tmp_path):  # free again once the first has finished
        pass
