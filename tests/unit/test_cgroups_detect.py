"""Pure parsing and decision logic of ``sidecar.cgroups`` (the real hierarchy is exercised by
``tests/integration/sidecar/test_run_memory_bound.py``)."""

from __future__ import annotations

from sidecar import cgroups

HYBRID = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC = "8:pids:/\n4:memory:/jobs/a1\n1:cpu,cpuacct:/\n0::/\n"


def test_mounts_and_own_paths_are_parsed() -> None:
    mounts = cgroups._mounts(HYBRID)
    assert ("/sys/fs/cgroup/memory", "cgroup", {"rw", "memory"}) in mounts
    assert ("/sys/fs/cgroup/unified", "cgroup2", {"rw"}) in mounts
    assert not [m for m in mounts if m[1] == "tmpfs"]
    own = cgroups._own_paths(PROC)
    assert own == {"pids": "/", "memory": "/jobs/a1", "cpu": "/", "cpuacct": "/", "": "/"}


def test_no_hierarchy_means_no_bound_with_a_reason() -> None:
    found = cgroups.detect(1, mountinfo="23 1 0:5 / / rw - ext4 /dev/sda rw\n", proc_cgroup="0::/\n")
    assert found.version is None
    assert "only per-process limits apply" in found.detail
    assert found.status() == {"cgroup": None, "detail": found.detail}


def test_disabled_by_setting() -> None:
    found = cgroups.detect(disabled=True)
    assert found.version is None and "KCR_LOCAL_CGROUPS=false" in found.detail


def test_enter_prefix_names_every_group_before_the_command() -> None:
    argv = cgroups.enter_argv(["/g/a/cgroup.procs", "/g/b/cgroup.procs"]) + ["setpriv", "x"]
    assert argv[-5:] == ["/g/a/cgroup.procs", "/g/b/cgroup.procs", "--", "setpriv", "x"]
