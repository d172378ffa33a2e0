"""Disk filling inside the sandbox is contained and reported (file size limit, disk quota, /dev/shm),
and the sidecar keeps serving. /tmp is the run's private directory, so it counts in the quota."""

from __future__ import annotations

import os

import pytest

from tests.support.sandbox import run, sandboxed, split_token

pytestmark = pytest.mark.integration

LIMITS = ("--max-file-size-mb", "2", "--disk-quota-mb", "8")

BIG_FILE = {
    "py": "open('/mnt/data/big.bin', 'wb').write(b'x' * (3 << 20))",
    "c": r"""#include <stdio.h>
#include <string.h>
int main(void) {
  static char mb[1 << 20]; FILE *f = fopen("/mnt/data/big.bin", "w");
  memset(mb, 'x', sizeof mb);
  for (int i = 0; i < 3; i++) { fwrite(mb, 1, sizeof mb, f); fflush(f); }
  puts("not reached");
  return 0;
}
""",
}


@pytest.mark.parametrize("lang", ["py", "c"])
async def test_file_size_limit(lang: str) -> None:
    async with sandboxed(lang, *LIMITS) as (sc, client):
        res = await run(client, BIG_FILE[lang])
        assert res["killed"] == "file_size", res
        assert res["exit_code"] != 0 and "file size limit exceeded (2 MB)" in res["stderr"]
        if lang == "c":  # SIGXFSZ; bwrap reports it as 128 + 25, the sidecar still names the limit
            assert res["exit_code"] == 153 and "not reached" not in res["stdout"]
        assert os.path.getsize(os.path.join(sc.working_dir, "big.bin")) <= 2 << 20
        assert (await run(client, {"py": "print('ok')", "c": '#include <stdio.h>\nint main(void){puts("ok");}'}[lang]))["stdout"] == "ok\n"


FILL = {
    "py": ("import time\nfor i in range(400):\n"
           "    open(f'{DIR}/f{i}', 'wb').write(b'x' * (1 << 20))\n    time.sleep(0.005)\nprint('not stopped')"),
    "bash": ('for i in $(seq 1 400); do head -c 1048576 /dev/zero > "$DIR/f$i"; sleep 0.005; done\n'
             "echo not stopped"),
}


@pytest.mark.parametrize("lang,where", [("py", "/tmp"), ("py", "/run/kcr/home"), ("bash", "/mnt/data")])
async def test_disk_quota_covers_mnt_data_and_private_dirs(lang: str, where: str) -> None:
    async with sandboxed(lang, *LIMITS) as (sc, client):
        code = (f"DIR = {where!r}\n" if lang == "py" else f"DIR={where}\n") + FILL[lang]
        res = await run(client, code, timeout=60)
        assert res["killed"] == "disk", (res["stdout"], res["stderr"])
        assert "not stopped" not in res["stdout"]
        assert "disk quota exceeded (8 MB" in res["stderr"]
        assert (await run(client, {"py": "print('ok')", "bash": "echo ok"}[lang]))["stdout"] == "ok\n"


async def test_dev_shm_is_small_and_private() -> None:
    tag = "kcr-shm-" + split_token()[0]
    code = (f"TAG = {tag!r}\nn = 0\ntry:\n    while n < 1000:\n"
            "        open(f'/dev/shm/{TAG}-{n}', 'wb').write(b'x' * (1 << 20))\n"
            "        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)")
    try:
        async with sandboxed("py", *LIMITS) as (_sc, client):
            res = await run(client, code)
            stopped = res["stdout"].split()
            assert stopped[:1] == ["stopped"] and int(stopped[1]) <= 64 and stopped[2] in ("27", "28"), res
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(tag)]  # private to the run
    finally:
        for name in os.listdir("/dev/shm"):
            if name.startswith(tag):
                os.unlink(os.path.join("/dev/shm", name))
