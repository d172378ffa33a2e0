"""``sidecar.sandbox``: the bubblewrap argv is built from explicit inputs (no host inspection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.sandbox import (
    MOUNT_POINT,
    RUN_DIR,
    Sandbox,
    etc_entries,
    exit_signal,
    root_layout,
    split_paths,
)

ROOT = (("ro", "/usr"), ("symlink", "usr/bin\0/bin"), ("symlink", "usr/lib\0/lib"))


def make(**kw: object) -> Sandbox:
    values: dict[str, object] = dict(bwrap="/usr/bin/bwrap", working_dir="/srv/sessions/a/wd",
                                     root=ROOT, etc=("/etc/ld.so.cache", "/etc/alternatives"))
    values.update(kw)
    return Sandbox(**values)  # type: ignore[arg-type]


def pairs(argv: list[str], option: str, n: int = 2) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + n]) for i, a in enumerate(argv) if a == option]


def test_namespaces_and_no_network_by_default() -> None:
    argv = make().args(None)
    assert argv[0] == "/usr/bin/bwrap" and argv[-1] == "--"
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "--share-net" not in argv
    assert "--share-net" in make(allow_network=True).args(None)


def test_filesystem_view() -> None:
    argv = make(ro_paths=("/opt/py/3.12",)).args("/var/lib/kcr/tmp/kcr-run-abc")
    assert ("/usr", "/usr") in pairs(argv, "--ro-bind")
    assert ("usr/bin", "/bin") in pairs(argv, "--symlink")
    assert ("/etc/ld.so.cache", "/etc/ld.so.cache") in pairs(argv, "--ro-bind-try")
    assert ("/opt/py/3.12", "/opt/py/3.12") in pairs(argv, "--ro-bind-try")
    binds = pairs(argv, "--bind")
    assert ("/srv/sessions/a/wd", MOUNT_POINT) in binds
    assert ("/var/lib/kcr/tmp/kcr-run-abc", RUN_DIR) in binds
    assert pairs(argv, "--chdir", 1) == [(MOUNT_POINT,)]
    assert pairs(argv, "--remount-ro", 1) == [("/dev",), ("/",)]  # no writable tmpfs but /tmp, /dev/shm
    # Read-write binds are exactly the run's own directories.
    assert {dst for _src, dst in binds} <= {MOUNT_POINT, RUN_DIR, "/tmp"}
    assert [dst for dst, in pairs(argv, "--tmpfs", 1)] == ["/dev/shm", "/tmp"]  # run dir has no tmp/
    # Nothing of the host's homes, config or data is mounted.
    sources = [src for opt in ("--bind", "--ro-bind", "--ro-bind-try") for src, _ in pairs(argv, opt)]
    assert not [s for s in sources if s.startswith(("/root", "/home", "/var", "/srv/sessions/b"))
                and s not in ("/srv/sessions/a/wd", "/var/lib/kcr/tmp/kcr-run-abc")]


def test_private_tmp_is_the_runs_own_dir(tmp_path: Path) -> None:
    run = tmp_path / "kcr-run-x"
    (run / "tmp").mkdir(parents=True)
    binds = pairs(make().args(str(run)), "--bind")
    assert (str(run / "tmp"), "/tmp") in binds
    # Without a run dir (e.g. the probe), /tmp is a fresh tmpfs.
    assert ("/tmp",) in pairs(make().args(None), "--tmpfs", 1)


def test_wrap_translates_the_host_temp_dir() -> None:
    tmp = "/data/sandboxes/go-1/tmp/kcr-run-q1w2"
    argv, env = make().wrap(
        ["/usr/bin/go", "build", "-o", f"{tmp}/main", "main.go", f"-of={tmp}/prog", f"{tmp}/classes:."],
        {"HOME": f"{tmp}/home", "TMPDIR": f"{tmp}/tmp", "GOCACHE": f"{tmp}/gocache", "PATH": "/usr/bin"},
        tmp,
    )
    cmd = argv[argv.index("--") + 1 :]
    assert cmd == ["/usr/bin/go", "build", "-o", f"{RUN_DIR}/main", "main.go", f"-of={RUN_DIR}/prog",
                   f"{RUN_DIR}/classes:."]
    assert env == {"HOME": f"{RUN_DIR}/home", "TMPDIR": "/tmp", "GOCACHE": f"{RUN_DIR}/gocache",
                   "PATH": "/usr/bin"}
    assert tmp not in " ".join(cmd) + " ".join(env.values())


def test_root_layout_follows_the_host(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "lib64").mkdir()  # a real directory on a non-merged system
    layout = root_layout(str(tmp_path))
    assert ("ro", "/usr") in layout and ("ro", "/lib64") in layout
    assert ("symlink", "usr/bin\0/bin") in layout
    assert not [v for _k, v in layout if "sbin" in v]  # absent entries are skipped
    argv = make(root=tuple(layout)).args(None)
    assert ("usr/bin", "/bin") in pairs(argv, "--symlink")
    assert ("/lib64", "/lib64") in pairs(argv, "--ro-bind")


def test_etc_is_curated(tmp_path: Path) -> None:
    for name in ("ld.so.cache", "java-17-openjdk", "resolv.conf", "pip.conf", "npmrc", "shadow", "R"):
        (tmp_path / name).write_text("x")
    assert etc_entries(False, etc=str(tmp_path)) == ["/etc/R", "/etc/java-17-openjdk", "/etc/ld.so.cache"]
    assert "/etc/resolv.conf" in etc_entries(True, etc=str(tmp_path))


def test_create_skips_paths_already_visible() -> None:
    sb = Sandbox.create("/x/wd", ro_paths=["/usr/local/lib/node_modules", "/opt/tool", "/opt/tool"],
                        bwrap="/usr/bin/bwrap")
    assert sb.ro_paths == ("/opt/tool",)


@pytest.mark.parametrize("code,sig", [(0, None), (1, None), (128, None), (137, 9), (152, 24), (153, 25), (255, None)])
def test_exit_signal(code: int, sig: int | None) -> None:
    assert exit_signal(code) == sig


def test_split_paths() -> None:
    assert split_paths("/a:/b/::") == ["/a", "/b"]
    assert split_paths("") == [] and split_paths(None) == []


def test_toolchain_paths_below_tmp_are_bound_over_the_private_tmp() -> None:
    """A checkout under /tmp (CI clones there) must stay visible: bind it after /tmp is mounted."""
    sb = Sandbox.create("/x/wd", ro_paths=["/tmp/clone/tests/node/node_modules", "/opt/tool"])
    argv = sb.args(None)
    tmp_mount = argv.index("/tmp", argv.index("--tmpfs"))
    late = argv.index("/tmp/clone/tests/node/node_modules")
    early = argv.index("/opt/tool")
    assert early < tmp_mount < late
    assert argv[late - 1] == "--ro-bind-try"


def test_etc_view_is_one_bind_and_holds_only_what_others_may_read(tmp_path: Path) -> None:
    import os
    import stat

    from sidecar.sandbox import build_etc_view

    entries = ["/etc/passwd", "/etc/ssl", "/etc/resolv.conf", "/etc/no-such-entry"]
    view = Path(build_etc_view(str(tmp_path / "etc"), entries, ["/etc/extra/tool", "/opt/x"]))
    assert (view / "passwd").read_bytes() == Path("/etc/passwd").read_bytes()
    for src, _dirs, names in os.walk("/etc/ssl"):
        for name in names:
            path = Path(src, name)
            copy = view / path.relative_to("/etc")
            if path.is_symlink():
                assert copy.is_symlink() and os.readlink(copy) == os.readlink(path)
            elif not os.lstat(path).st_mode & stat.S_IROTH or not os.access(src, os.X_OK):
                assert not copy.exists()
    if Path("/etc/ssl/private").is_dir() and not os.stat("/etc/ssl/private").st_mode & stat.S_IXOTH:
        assert not (view / "ssl" / "private").exists()  # others may not enter it: not copied
    # Live entries and extra read-only paths below /etc get empty mount points, bound on top.
    assert (view / "resolv.conf").read_bytes() == b"" and (view / "extra" / "tool").exists()
    assert not (view / "no-such-entry").exists()
    argv = make(etc_view=str(view), etc=("/etc/passwd", "/etc/resolv.conf")).args(None)
    assert (str(view), "/etc") in pairs(argv, "--ro-bind")
    assert pairs(argv, "--ro-bind-try") == [("/etc/resolv.conf", "/etc/resolv.conf")]
