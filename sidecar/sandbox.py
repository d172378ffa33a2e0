"""The bubblewrap sandbox around every user process of a local sidecar (argv builder + probe).

Why bubblewrap: it is a small, kept tool (Debian's ``bubblewrap``, used by Flatpak) that builds
namespaces and mounts for an unprivileged user; writing that namespace code ourselves would be a
security liability. Each user process (pre-warmed interpreter, compile step, program) is exec'd as

    [setpriv --reuid=U ... --] prlimit ... -- bwrap <view> -- <command>

so bwrap runs unprivileged (as the run uid when the sidecar is root, else as the sidecar's uid) inside
a fresh user namespace, after the rlimits are set: they are inherited by everything inside.

What the program sees (built by ``Sandbox.args``):

* new user, PID, IPC, UTS, network and cgroup namespaces (``--unshare-all``; ``--share-net`` only
  when network is allowed); no nested user namespaces (``--disable-userns``); a new session (no
  terminal injection); ``--die-with-parent``; no capabilities (bwrap drops them for non-root).
  In its PID namespace pid 1 is bwrap's reaper, so ``kill -9 -1`` or ``kill(getppid())`` reach
  only the run's own processes, and the whole namespace dies with the program.
* a read-only root tmpfs with: ``/usr`` and the merged-``/usr`` links (``/bin /lib /lib64 /sbin``)
  read-only, a curated read-only subset of ``/etc`` (loader cache, alternatives, certificates, the
  toolchains' config such as ``/etc/java-*``, ``/etc/ldc2.conf``, ``/etc/R``), the tool directories
  outside ``/usr`` the sidecar resolved (e.g. a pyenv interpreter's prefix, ``NODE_PATH`` dirs) and
  any extra read-only paths configured, each at its own path;
* ``/proc`` of its own PID namespace, a minimal read-only ``/dev`` (null, zero, random, tty, ...),
  a small private ``/dev/shm`` tmpfs (``SHM_MB``; outside the disk quota, so kept small);
* the run's working directory read-write at ``/mnt/data`` (the cwd);
* the run's private temp dir read-write at ``/run/kcr`` (``HOME`` is ``/run/kcr/home``, compiled
  binaries and caches live there) and its ``tmp`` subdirectory at ``/tmp`` (``TMPDIR=/tmp``).

Nothing else of the host: no server data dir (other sessions' sandboxes and files), no ``/root``
or ``/home``, no ``/var``, ``/run`` or ``/sys``, and the environment is the sidecar's fixed one.

Paths: the runner computes argv and env with host paths of the private temp dir. Instead of
binding that dir at its host path (which may itself lie below ``/tmp`` and so collide with the
private ``/tmp``, and would reveal host paths), ``wrap`` rewrites every occurrence of the host temp
dir in argv and env to ``/run/kcr``; the temp dir's name is random, so the rewrite cannot hit
anything else. The working dir never appears in argv (programs run relative to the cwd).

Exit status: bwrap reports a program killed by signal N as exit code 128 + N (its reaper cannot
re-raise the signal), so callers map 129..192 back to signals when sandboxed.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MOUNT_POINT = "/mnt/data"
RUN_DIR = "/run/kcr"
# Processes bwrap adds to every run (the outer monitor and the PID namespace's reaper): RLIMIT_NPROC
# counts them against the run's uid.
EXTRA_PROCESSES = 2
SHM_MB = 64

_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BWRAP = shutil.which("bwrap", path=_SAFE_PATH)

# Top-level entries that hold the toolchains: ``/usr`` plus, on merged-/usr systems, symlinks.
ROOT_ENTRIES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# /etc entries programs and toolchains read. Deliberately not the whole of /etc: it may hold the
# operator's configuration (pip/npm credentials, service configs) that user code must not read.
ETC_ENTRIES = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "passwd", "group", "nsswitch.conf", "host.conf", "hosts", "gai.conf", "protocols", "services",
    "ssl", "ca-certificates", "ca-certificates.conf", "pki", "mime.types", "magic", "magic.mime",
    "locale.alias", "os-release", "debian_version", "lsb-release", "inputrc", "terminfo",
    "fonts", "ldc2.conf", "R", "php", "papersize", "libpaper.d", "matplotlibrc", "gfortran",
)
ETC_GLOBS = ("java-*", "python3*", "php*", "perl")
NETWORK_ETC = ("resolv.conf",)


def _covered(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def root_layout(root: str = "/") -> list[tuple[str, str]]:
    """``(kind, value)`` for each top-level toolchain entry present: ``("ro", "/usr")`` or
    ``("symlink", "usr/bin→/bin")``, as found on this host."""
    out: list[tuple[str, str]] = []
    for entry in ROOT_ENTRIES:
        host = os.path.join(root, entry.lstrip("/"))
        if os.path.islink(host):
            out.append(("symlink", f"{os.readlink(host)}\0{entry}"))
        elif os.path.isdir(host):
            out.append(("ro", entry))
    return out


def etc_entries(allow_network: bool, etc: str = "/etc") -> list[str]:
    """The curated ``/etc`` paths that exist on this host (absolute, sorted)."""
    names = set(ETC_ENTRIES) | (set(NETWORK_ETC) if allow_network else set())
    for pattern in ETC_GLOBS:
        names |= {os.path.basename(p) for p in glob.glob(os.path.join(etc, pattern))}
    return sorted(f"/etc/{n}" for n in names if os.path.lexists(os.path.join(etc, n)))


def python_dirs(python: str) -> list[str]:
    """Directories an interpreter outside ``/usr`` needs (its prefix; a venv's base prefix).

    Asks the interpreter itself (once, at start-up): the prefix is not always ``bin/..``.
    """
    real = os.path.realpath(python)
    if _covered(real, ("/usr",)) and _covered(os.path.abspath(python), ("/usr", "/bin")):
        return []
    try:
        out = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix);"
                              " print(sys.exec_prefix)"], capture_output=True, text=True, timeout=30,
                             env={"PATH": _SAFE_PATH}, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = [os.path.dirname(os.path.dirname(real))]
    dirs = {os.path.dirname(os.path.dirname(os.path.abspath(python))), *out}
    return sorted(d for d in dirs if d and d != "/" and not _covered(d, ("/usr",)))


def split_paths(value: str | Sequence[str] | None) -> list[str]:
    if not value:
        return []
    items = value.split(":") if isinstance(value, str) else list(value)
    return [os.path.abspath(p) for p in items if p.strip()]


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A bubblewrap view for one sidecar. ``args`` is pure: the host is inspected in ``create``."""

    bwrap: str
    working_dir: str  # host path, bound read-write at /mnt/data
    allow_network: bool = False
    ro_paths: tuple[str, ...] = ()  # extra host dirs/files, read-only at the same path
    root: tuple[tuple[str, str], ...] = ()  # from root_layout()
    etc: tuple[str, ...] = ()  # from etc_entries()
    shm_mb: int = SHM_MB
    # A prepared copy of the curated /etc (``build_etc_view``), bound as one mount; None: bind
    # each entry of ``etc`` on its own.
    etc_view: str | None = None
    _static: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def create(cls, working_dir: str, *, allow_network: bool = False, ro_paths: Iterable[str] = (),
               bwrap: str | None = None, shm_mb: int = SHM_MB, etc_view: str | None = None) -> Sandbox:
        exe = bwrap or BWRAP
        if not exe:
            raise FileNotFoundError("bwrap (Debian package bubblewrap) is not installed")
        root = tuple(root_layout())
        bound = [v for k, v in root if k == "ro"]
        extra = tuple(dict.fromkeys(p for p in ro_paths if not _covered(p, bound)))
        return cls(exe, os.path.abspath(working_dir), allow_network, extra, root,
                   tuple(etc_entries(allow_network)), shm_mb, etc_view)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_static", tuple(self._build_static()))

    def _build_static(self) -> list[str]:
        a = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
        if self.allow_network:
            a.append("--share-net")
        a += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        for kind, value in self.root:
            if kind == "ro":
                a += ["--ro-bind", value, value]
            else:
                target, link = value.split("\0")
                a += ["--symlink", target, link]
        if self.etc_view is not None:
            # One mount instead of ~40: bubblewrap re-reads /proc/self/mountinfo after every bind,
            # so each bind costs CPU in proportion to the mounts already there (measured: 15.8 ms
            # of CPU per sandbox with the entries bound one by one, 7.2 ms without them).
            a += ["--ro-bind", self.etc_view, "/etc"]
            a += [x for path in self.etc if path in _live_etc() for x in ("--ro-bind-try", path, path)]
        else:
            for path in self.etc:
                a += ["--ro-bind-try", path, path]
        for path in self.ro_paths:
            if not _under_tmp(path):  # those are bound after the private /tmp (see args)
                a += ["--ro-bind-try", path, path]
        a += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(self.shm_mb * 1024 * 1024),
              "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]  # /dev: no memory-backed files
        return a

    def args(self, tmp: str | None) -> list[str]:
        """The bwrap argv up to and including ``--`` for a run whose private temp dir is ``tmp``."""
        a = list(self._static)
        if tmp is not None:
            a += ["--bind", tmp, RUN_DIR]
            if os.path.isdir(os.path.join(tmp, "tmp")):
                a += ["--bind", os.path.join(tmp, "tmp"), "/tmp"]
            else:
                a += ["--perms", "1777", "--tmpfs", "/tmp"]
        else:
            a += ["--perms", "1777", "--tmpfs", "/tmp"]
        # Toolchain paths below /tmp (a checkout or venv there, as in a CI clone) would be hidden
        # by the private /tmp mounted above, so they are bound on top of it, read-only.
        for path in self.ro_paths:
            if _under_tmp(path):
                a += ["--ro-bind-try", path, path]
        a += ["--bind", self.working_dir, MOUNT_POINT, "--chdir", MOUNT_POINT, "--remount-ro", "/", "--"]
        return a

    def wrap(self, argv: Sequence[str], env: Mapping[str, str], tmp: str | None
             ) -> tuple[list[str], dict[str, str]]:
        """``(argv, env)`` to execute instead: bwrap in front, host temp-dir paths translated."""
        if tmp:
            tmp = tmp.rstrip("/")
            argv = [a.replace(tmp, RUN_DIR) for a in argv]
            env = {k: v.replace(tmp, RUN_DIR) for k, v in env.items()}
            if env.get("TMPDIR", "").startswith(RUN_DIR):
                env["TMPDIR"] = "/tmp"
        return self.args(tmp) + list(argv), dict(env)


def _live_etc() -> set[str]:
    """``/etc`` entries that stay live binds over the view: they change while we run (DHCP)."""
    return {f"/etc/{n}" for n in NETWORK_ETC}


def build_etc_view(dest: str, entries: Iterable[str], mount_points: Iterable[str] = ()) -> str:
    """Copy the curated ``/etc`` entries into ``dest`` (a new directory) and return it.

    Only what any user may read is copied (files readable by others, directories they may
    enter; symlinks as symlinks), so the sandbox's unprivileged uid sees exactly what it saw
    through one bind per entry, minus nothing it could read. Entries that must stay live
    (``_live_etc``) and extra read-only paths below ``/etc`` get an empty placeholder: they are
    bound on top of the view (bubblewrap cannot create a mount point inside a read-only bind).
    The copy is taken when the sidecar starts: an ``/etc`` change reaches sandboxes of
    sidecars started after it.
    """
    os.mkdir(dest, 0o755)
    os.chmod(dest, 0o755)
    live = _live_etc()
    for path in entries:
        target = os.path.join(dest, os.path.relpath(path, "/etc"))
        if path in live:
            _placeholder(path, target)
        else:
            _copy_readable(path, target)
    for path in mount_points:
        if _covered(path, ("/etc",)) and path != "/etc":
            target = os.path.join(dest, os.path.relpath(path, "/etc"))
            if not os.path.lexists(target):
                os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                _placeholder(path, target)
    return dest


def _placeholder(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        with open(target, "wb"):
            pass
        os.chmod(target, 0o644)


def _copy_readable(source: str, target: str) -> None:
    try:
        st = os.lstat(source)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(st.st_mode):
        if st.st_mode & 0o005 != 0o005:  # others may not list or enter it: it stays invisible
            return
        os.mkdir(target, 0o755)
        try:
            names = sorted(os.listdir(source))
        except OSError:
            names = []
        for name in names:
            _copy_readable(os.path.join(source, name), os.path.join(target, name))
        os.chmod(target, stat.S_IMODE(st.st_mode) & 0o755)
    elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o004:
        try:
            shutil.copyfile(source, target)
        except OSError:
            return
        os.chmod(target, stat.S_IMODE(st.st_mode) & 0o755)


def exit_signal(returncode: int) -> int | None:
    """The signal a sandboxed program died of (bwrap reports 128 + N), else None."""
    if 128 < returncode <= 128 + 64:
        return returncode - 128
    return None


def payload_pid(pid: int) -> int:
    """The program below bwrap's monitor and reaper: follow the only child down (host pids).

    Used to adjust a waiting pre-warmed interpreter's rlimits (they are per process, and the pid
    the sidecar spawned is bwrap's). Returns ``pid`` itself if there is no single chain.
    """
    current = pid
    for _ in range(4):
        try:
            with open(f"/proc/{current}/task/{current}/children", "rb") as fh:
                kids = fh.read().split()
        except OSError:
            break
        if len(kids) != 1:
            break
        current = int(kids[0])
    return current


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def not_exiting(pid: int) -> bool:
    """True while ``pid`` exists, is not a zombie, and has not started exiting (``PF_EXITING``).

    An exiting task can never run user code again: waiting for the rest of its teardown (a PID
    namespace's reaper unmounts the sandbox's mounts on its way out) gains nothing.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            rest = fh.read().rsplit(b")", 1)[1].split()
        return rest[0] not in (b"Z", b"X") and not int(rest[6]) & PF_EXITING
    except (OSError, IndexError, ValueError):
        return False


def _under_tmp(path: str) -> bool:
    return os.path.abspath(path).startswith("/tmp/")


def probe(*, allow_network: bool = False, ro_paths: Iterable[str] = (), uid: int | None = None,
          gid: int | None = None, base: str | None = None, timeout: float = 15.0,
          setpriv: str | None = None, bwrap: str | None = None, etc_view: str | None = None) -> str | None:
    """Run one trivial sandboxed command as the run uid; None if it worked, else why not.

    Checks that the namespaces and mounts can be set up here (bwrap installed, user namespaces
    enabled) and that the program sees a writable ``/mnt/data`` as its cwd. Blocking (tens of ms).
    """
    exe = bwrap or BWRAP
    if not exe:
        return "bwrap is not installed (Debian package bubblewrap)"
    root = tempfile.mkdtemp(prefix="kcr-sandbox-probe-", dir=base)
    try:
        wd, tmp = os.path.join(root, "wd"), os.path.join(root, "run")
        for p in (wd, tmp, os.path.join(tmp, "tmp"), os.path.join(tmp, "home")):
            os.makedirs(p, exist_ok=True)
        os.chmod(root, 0o711)
        if uid is not None:
            for p in (wd, tmp, os.path.join(tmp, "tmp"), os.path.join(tmp, "home")):
                os.chown(p, uid, gid if gid is not None else uid)
        sb = Sandbox.create(wd, allow_network=allow_network, ro_paths=ro_paths, bwrap=exe, etc_view=etc_view)
        script = 'test "$(pwd)" = /mnt/data && : > /mnt/data/probe && : > /tmp/probe && test ! -e /root'
        argv, env = sb.wrap(["/bin/sh", "-c", script], {"PATH": _SAFE_PATH}, tmp)
        kwargs: dict[str, object] = {}
        if uid is not None:
            tool = setpriv or shutil.which("setpriv", path=_SAFE_PATH)
            if tool:
                g = gid if gid is not None else uid
                argv = [tool, f"--reuid={uid}", f"--regid={g}", "--clear-groups", "--no-new-privs", "--"] + argv
            else:
                kwargs.update(user=uid, group=gid if gid is not None else uid, extra_groups=[])
        try:
            res = subprocess.run(argv, env=env, cwd=wd, capture_output=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bwrap could not run: {exc}"
        if res.returncode != 0 or not os.path.exists(os.path.join(wd, "probe")):
            detail = res.stderr.decode("utf-8", "replace").strip()[-500:] or f"exit code {res.returncode}"
            return f"bwrap failed: {detail}"
        return None
    finally:
        shutil.rmtree(root, ignore_errors=True)


class SandboxError(RuntimeError):
    """``--sandbox bwrap`` was asked for but bubblewrap does not work here."""


def for_sidecar(mode: str, working_dir: str, *, allow_network: bool, ro_paths: str, language: str,
                python: str, node_path: str | None, uid: int | None, gid: int | None,
                tmp_root: str, bwrap: str | None = None, etc_view: str | None = None
                ) -> tuple[Sandbox | None, str | None]:
    """The sidecar's sandbox for ``--sandbox none|bwrap|auto``: ``(sandbox or None, warning)``.

    Probes once (as the run uid) before anything is served. ``bwrap`` raises ``SandboxError`` when
    the probe fails; ``auto`` falls back to no sandbox and returns a warning to log.
    """
    mode = (mode or "none").strip().lower()
    if mode not in ("none", "bwrap", "auto"):
        raise SandboxError(f"unknown sandbox mode {mode!r} (none, bwrap or auto)")
    if mode == "none":
        return None, None
    extra = split_paths(ro_paths)
    if language == "py":
        extra += python_dirs(python)
    if language in ("js", "ts"):
        extra += split_paths(node_path)
    view: str | None = etc_view if etc_view and os.path.isdir(etc_view) else None
    if view is not None and any(not os.path.lexists(os.path.join(view, os.path.relpath(p, "/etc")))
                                for p in extra if _covered(p, ("/etc",)) and p != "/etc"):
        view = None  # it has no mount point for one of our extra paths: build our own
    if view is None:  # a view of our own (a local executor builds one per server and passes it)
        try:
            view = build_etc_view(os.path.join(tmp_root, "etc"), etc_entries(allow_network), extra)
        except OSError:  # e.g. no room: bind the entries one by one (slower, same view)
            view = None
    error = probe(allow_network=allow_network, ro_paths=extra, uid=uid, gid=gid, base=tmp_root,
                  bwrap=bwrap, etc_view=view)
    if error is None:
        return Sandbox.create(working_dir, allow_network=allow_network, ro_paths=extra, bwrap=bwrap,
                              etc_view=view), None
    if mode == "bwrap":
        raise SandboxError(f"the bubblewrap sandbox does not work here: {error}")
    return None, f"running user code WITHOUT a sandbox: {error}"
