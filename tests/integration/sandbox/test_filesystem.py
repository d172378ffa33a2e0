"""What a sandboxed program can see and write, in py, bash and c (real sidecars, real bwrap).

Every assertion here fails without the sandbox: the sidecars of these tests share one run uid, so
only the mount view (not file permissions) keeps them apart.
"""

from __future__ import annotations

import os

import pytest

from tests.support.sandbox import run, sandboxed, split_token, upload
from tests.support.sidecar import REPO

pytestmark = pytest.mark.integration

LIST_MNT_DATA = {
    "py": "import os\nprint(os.getcwd())\nprint('\\n'.join(os.listdir('/mnt/data')))\n"
          "print(open('/mnt/data/a.csv').read(), end='')",
    "bash": "pwd\nls -A /mnt/data\ncat /mnt/data/a.csv",
    "c": r"""#include <stdio.h>
#include <dirent.h>
#include <string.h>
#include <unistd.h>
int main(void) {
  char cwd[4096]; DIR *d; struct dirent *e; FILE *f; int c;
  printf("%s\n", getcwd(cwd, sizeof cwd));
  d = opendir("/mnt/data");
  while ((e = readdir(d)) != NULL)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) printf("%s\n", e->d_name);
  closedir(d);
  f = fopen("/mnt/data/a.csv", "r");
  while ((c = fgetc(f)) != EOF) putchar(c);
  return 0;
}
""",
}
SOURCE = {"py": "code.py", "bash": "code.sh", "c": "code.c"}


@pytest.mark.parametrize("lang", ["py", "bash", "c"])
async def test_mnt_data_is_the_cwd_and_holds_exactly_the_inputs(lang: str) -> None:
    async with sandboxed(lang) as (sc, client):
        await upload(client, "a.csv", b"x,y\n1,2\n")
        await upload(client, "b.txt", b"b")
        res = await run(client, LIST_MNT_DATA[lang])
        assert res["exit_code"] == 0, res["stderr"]
        lines = res["stdout"].splitlines()
        assert lines[0] == "/mnt/data"
        assert lines[-2:] == ["x,y", "1,2"]
        assert set(lines[1:-2]) == {"a.csv", "b.txt", SOURCE[lang]}
        assert res["generated"] == []


OTHER_SESSION = {
    "py": """import os
secret = (HALF_A + HALF_B).encode()
for p in (OTHER_FILE, OTHER_WD, OTHER_ROOT):
    print(p, 'VISIBLE' if os.path.exists(p) else 'absent')
try:
    print(open(OTHER_FILE).read())
except OSError as e:
    print('cannot open', type(e).__name__)
hits = []
for top in ('/mnt/data', '/tmp', '/run', '/dev/shm', '/etc'):
    for d, _dirs, names in os.walk(top):
        for n in names:
            try:
                with open(os.path.join(d, n), 'rb') as fh:
                    if secret in fh.read(1 << 20):
                        hits.append(os.path.join(d, n))
            except OSError:
                pass
print('hits', hits)
""",
    "bash": """secret="$HALF_A$HALF_B"
for p in "$OTHER_FILE" "$OTHER_WD" "$OTHER_ROOT"; do
  if [ -e "$p" ]; then echo "$p VISIBLE"; else echo "$p absent"; fi
done
cat "$OTHER_FILE" 2>/dev/null || echo "cannot open"
echo "hits $(grep -rlF "$secret" /mnt/data /tmp /run /dev/shm /etc 2>/dev/null | tr '\\n' ' ')"
""",
    "c": r"""#include <stdio.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
int main(void) {
  const char *paths[] = {OTHER_FILE, OTHER_WD, OTHER_ROOT};
  struct stat st; FILE *f; char buf[256];
  for (int i = 0; i < 3; i++)
    printf("%s %s\n", paths[i], stat(paths[i], &st) == 0 ? "VISIBLE" : "absent");
  f = fopen(OTHER_FILE, "r");
  if (f && fgets(buf, sizeof buf, f)) printf("%s\n", buf); else printf("cannot open %s\n", strerror(errno));
  printf("hits\n");
  return 0;
}
""",
}


def _bind(lang: str, code: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        if lang == "py":
            code = f"{key} = {value!r}\n" + code
        elif lang == "bash":
            code = f"{key}='{value}'\n" + code
        else:
            code = f'#define {key} "{value}"\n' + code
    return code


@pytest.mark.parametrize("lang", ["py", "bash", "c"])
async def test_another_sessions_files_are_invisible(lang: str) -> None:
    secret, half_a, half_b = split_token()
    async with sandboxed("py") as (other, other_client), sandboxed(lang) as (_sc, client):
        await upload(other_client, "secret.txt", secret.encode())
        other_file = os.path.join(other.working_dir, "secret.txt")
        assert os.path.exists(other_file)
        # The other session can read its own file at /mnt/data.
        own = await run(other_client, "print(open('/mnt/data/secret.txt').read())")
        assert own["stdout"].strip() == secret
        code = _bind(lang, OTHER_SESSION[lang], {
            "OTHER_FILE": other_file, "OTHER_WD": other.working_dir,
            "OTHER_ROOT": os.path.dirname(other.working_dir), "HALF_A": half_a, "HALF_B": half_b})
        res = await run(client, code)
        assert res["exit_code"] == 0, res["stderr"]
        out = res["stdout"]
        assert "VISIBLE" not in out and out.count("absent") == 3, out
        assert "cannot open" in out
        assert secret not in out + res["stderr"]
        hits = out.split("hits", 1)[1].strip()
        assert hits in ("", "[]"), hits


HOST_PATHS_CODE = {
    "py": "import os\nfor p in PATHS:\n    print(p, 'VISIBLE' if os.path.lexists(p) else 'absent')\n",
    "c": r"""#include <stdio.h>
#include <sys/stat.h>
int main(void) {
  const char *paths[] = {PATHS};
  struct stat st;
  for (unsigned i = 0; i < sizeof paths / sizeof *paths; i++)
    printf("%s %s\n", paths[i], lstat(paths[i], &st) == 0 ? "VISIBLE" : "absent");
  return 0;
}
""",
}


@pytest.mark.parametrize("lang", ["py", "c"])
async def test_host_homes_config_and_server_paths_are_invisible(lang: str) -> None:
    async with sandboxed(lang) as (sc, client):
        root = os.path.dirname(sc.working_dir)
        paths = ["/root", "/home", "/var", "/srv", "/opt", "/boot", "/sys", "/etc/shadow", "/etc/ssh",
                 "/etc/pip.conf", "/etc/npmrc", "/etc/environment", str(REPO), sc.working_dir, root,
                 os.path.join(root, "tmp")]
        assert all(os.path.lexists(p) for p in (sc.working_dir, root, str(REPO)))
        if lang == "py":
            code = f"PATHS = {paths!r}\n" + HOST_PATHS_CODE["py"]
        else:
            code = HOST_PATHS_CODE["c"].replace("PATHS", ", ".join(f'"{p}"' for p in paths))
        res = await run(client, code)
        assert res["exit_code"] == 0, res["stderr"]
        seen = dict(line.rsplit(" ", 1) for line in res["stdout"].splitlines())
        assert seen == {p: "absent" for p in paths}


WRITE_CODE = {
    "py": """import os
for p in TARGETS:
    try:
        with open(p, 'w') as fh:
            fh.write('x')
        print(p, 'WRITTEN')
    except OSError as e:
        print(p, 'refused', e.errno)
""",
    "bash": """for p in "${TARGETS[@]}"; do
  if (echo x > "$p") 2>/dev/null; then echo "$p WRITTEN"; else echo "$p refused"; fi
done
""",
    "c": r"""#include <stdio.h>
int main(void) {
  const char *targets[] = {TARGETS};
  for (unsigned i = 0; i < sizeof targets / sizeof *targets; i++) {
    FILE *f = fopen(targets[i], "w");
    if (f && fputs("x", f) >= 0 && fclose(f) == 0) printf("%s WRITTEN\n", targets[i]);
    else printf("%s refused\n", targets[i]);
  }
  return 0;
}
""",
}


@pytest.mark.parametrize("lang", ["py", "bash", "c"])
async def test_writes_land_only_in_mnt_data_and_private_dirs(lang: str) -> None:
    tag = "kcr-escape-" + split_token()[0]
    async with sandboxed(lang) as (sc, client):
        root = os.path.dirname(sc.working_dir)
        refused = [f"/{tag}", f"/etc/{tag}", f"/usr/{tag}", f"/usr/local/{tag}", f"/bin/{tag}",
                   f"/run/{tag}", f"/mnt/{tag}", f"/dev/{tag}", f"/proc/{tag}", f"/var/tmp/{tag}",
                   f"/home/{tag}", f"/root/{tag}", f"{sc.working_dir}/{tag}", f"{root}/{tag}"]
        allowed = [f"/mnt/data/{tag}", f"/tmp/{tag}", f"/run/kcr/home/{tag}", f"/dev/shm/{tag}"]
        targets = refused + allowed
        if lang == "py":
            code = f"TARGETS = {targets!r}\n" + WRITE_CODE["py"]
        elif lang == "bash":
            code = "TARGETS=(" + " ".join(f"'{t}'" for t in targets) + ")\n" + WRITE_CODE["bash"]
        else:
            code = WRITE_CODE["c"].replace("TARGETS", ", ".join(f'"{t}"' for t in targets))
        try:
            res = await run(client, code)
            assert res["exit_code"] == 0, res["stderr"]
            seen = {line.split(" ")[0]: line.split(" ")[1] for line in res["stdout"].splitlines()}
            assert {p: seen.get(p) for p in refused} == {p: "refused" for p in refused}
            assert {p: seen.get(p) for p in allowed} == {p: "WRITTEN" for p in allowed}
            # On the host, only the working dir got the file (reported as generated).
            assert [g["name"] for g in res["generated"]] == [tag]
            assert os.path.exists(os.path.join(sc.working_dir, tag))
            for host in (f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}", f"/{tag}", f"{root}/{tag}"):
                assert not os.path.exists(host), host
            # /tmp, HOME and /dev/shm are the run's own: the next run starts empty.
            again = await run(client, {"py": f"import os\nprint([os.path.exists(p) for p in {allowed[1:]!r}])",
                                       "bash": " ".join(f"[ -e {p} ] && echo True || echo False;"
                                                        for p in allowed[1:]),
                                       "c": "int main(void){return 0;}"}[lang])
            assert "True" not in again["stdout"], again["stdout"]
        finally:
            for host in (f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}", f"/{tag}"):
                if os.path.exists(host):
                    os.unlink(host)
