"""The program file (``sidecar/program_file.py``): a pre-warmed run's file is made with its
interpreter and renamed into the fresh working directory; whenever that cannot be done exactly,
the general way (in place, or created exclusively) writes it. Real files, real sidecars."""

from __future__ import annotations

import ast
import glob
import os
import stat
import tempfile
from collections.abc import Iterator

import httpx
import pytest
import trio

from sidecar import program_file
from sidecar.limits import Identity
from tests.support.sidecar import running_sidecar

ME = Identity()  # as the test itself: the owner checks compare with our euid
CODE = "print('é ✓')\n"


@pytest.fixture
def dirs() -> Iterator[tuple[str, str]]:
    """A working dir and a private temp dir on the same filesystem."""
    with tempfile.TemporaryDirectory() as root:
        wd, tmp = os.path.join(root, "wd"), os.path.join(root, "tmp")
        os.mkdir(wd)
        os.mkdir(tmp)
        yield wd, tmp


def test_a_staged_file_is_renamed_into_a_fresh_dir(dirs: tuple[str, str]) -> None:
    wd, tmp = dirs
    staged = program_file.stage(tmp, ME)
    assert staged is not None and os.path.getsize(staged) == 0
    inode = os.stat(staged).st_ino
    program_file.write(wd, "code.py", CODE, ME, staged)
    path = os.path.join(wd, "code.py")
    st = os.stat(path)
    assert st.st_ino == inode  # the staged file itself, not a new one
    assert not os.path.exists(staged)
    assert _read(path) == CODE
    assert stat.S_IMODE(st.st_mode) == 0o644 & ~_umask() and st.st_nlink == 1


def test_a_taken_name_is_written_in_place_and_the_staged_file_stays(dirs: tuple[str, str]) -> None:
    wd, tmp = dirs
    path = os.path.join(wd, "code.py")
    with open(path, "w") as f:  # an upload of that name, longer than the code
        f.write("x" * 100)
    inode = os.stat(path).st_ino
    staged = program_file.stage(tmp, ME)
    assert staged is not None
    program_file.write(wd, "code.py", CODE, ME, staged)
    assert os.stat(path).st_ino == inode and _read(path) == CODE
    assert os.path.getsize(staged) == 0  # untouched: it goes with the temp dir


@pytest.mark.parametrize("tamper", ["hardlink", "symlink", "not_empty", "gone"])
def test_a_staged_file_that_is_not_ours_is_never_used(dirs: tuple[str, str], tamper: str) -> None:
    wd, tmp = dirs
    staged = program_file.stage(tmp, ME)
    assert staged is not None
    target = os.path.join(tmp, "target")
    with open(target, "w") as f:
        f.write("TARGET")
    if tamper == "hardlink":
        os.unlink(staged)
        os.link(target, staged)
    elif tamper == "symlink":
        os.unlink(staged)
        os.symlink(target, staged)
    elif tamper == "not_empty":
        with open(staged, "w") as f:
            f.write("planted")
    else:
        os.unlink(staged)
    program_file.write(wd, "code.py", CODE, ME, staged)
    path = os.path.join(wd, "code.py")
    assert _read(path) == CODE
    assert not os.path.islink(path) and os.stat(path).st_nlink == 1
    assert _read(target) == "TARGET"  # nothing written through the planted name


def test_another_filesystem_falls_back_to_creating_the_file(dirs: tuple[str, str]) -> None:
    wd, _ = dirs
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(wd).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        staged = program_file.stage(other, ME)
        assert staged is not None
        program_file.write(wd, "code.py", CODE, ME, staged)  # rename: EXDEV
        assert _read(os.path.join(wd, "code.py")) == CODE


def test_stage_gives_none_where_it_cannot_create(dirs: tuple[str, str]) -> None:
    _, tmp = dirs
    assert program_file.stage(os.path.join(tmp, "missing"), ME) is None


async def test_a_prewarmed_run_gets_the_file_its_interpreter_was_started_with() -> None:
    """Through a real sidecar: after ``/reset`` (a fresh working dir) the run's ``code.py`` is the
    file staged in the waiting interpreter's temp dir, and that dir no longer holds it."""
    code = ("import os\nst = os.stat('code.py')\nprint(st.st_ino, st.st_nlink, oct(st.st_mode & 0o777))\n"
            "print(sorted(os.listdir(os.path.dirname(os.environ['HOME']))))\n"
            "print(repr(open('code.py', encoding='utf-8').read()))  # é\n")
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        for _ in range(2):
            assert (await client.post("/reset")).status_code == 200
            staged = await _staged_file(os.path.dirname(sc.working_dir))
            inode = os.stat(staged).st_ino
            res = (await client.post("/execute", json={"code": code, "timeout": 10})).json()
            assert res["exit_code"] == 0, res
            first, listing, text = res["stdout"].splitlines()
            assert first == f"{inode} 1 0o644"
            assert ast.literal_eval(listing) == ["home", "tmp"]
            assert ast.literal_eval(text) == code


async def _staged_file(root: str) -> str:
    """The waiting interpreter's staged file below the sidecar's temp root (it is started in the
    background after ``/reset``: polled with a deadline)."""
    with trio.fail_after(10):
        while True:
            found = glob.glob(os.path.join(root, "tmp", "*", "kcr-run-*", program_file.STAGED_NAME))
            if len(found) == 1:
                return found[0]
            await trio.sleep(0.01)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
