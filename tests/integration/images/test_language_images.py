"""Each execution image, run the way an execution pod runs it: uid 65532, read-only root
filesystem, /mnt/data and /tmp as fresh tmpfs (emptyDir), all capabilities dropped, no privilege
escalation and no network. It must run hello-world in each of its languages and hand back the file
the program wrote (listed by GET /files, downloaded by GET /files/{name})."""

from __future__ import annotations

import httpx
import pytest

from tests.support import containers
from tests.support.container_pod import RunningContainer, pod_spec

from .conftest import wait_ready

# language -> (image suffix, program printing "hello <lang>" and writing out.txt = "data <lang>")
PROGRAMS = {
    "py": ("python", "print('hello py')\nopen('out.txt', 'w').write('data py')\n"),
    "js": ("javascript", "console.log('hello js');\nrequire('fs').writeFileSync('out.txt', 'data js');\n"),
    "ts": ("typescript", ("const who: string = 'ts';\nconsole.log(`hello ${who}`);\n"
                         "require('fs').writeFileSync('out.txt', `data ${who}`);\n")),
    "bash": ("bash", "echo hello bash\nprintf 'data bash' > out.txt\n"),
    "go": ("go", ('package main\nimport ("fmt"; "os")\nfunc main() {\n fmt.Println("hello go")\n'
                 ' os.WriteFile("out.txt", []byte("data go"), 0644)\n}\n')),
    "java": ("java", ('import java.nio.file.*;\npublic class Code { public static void main(String[] a) throws Exception {\n'
                     ' System.out.println("hello java");\n Files.writeString(Path.of("out.txt"), "data java");\n} }\n')),
    "c": ("c-cpp", ('#include <stdio.h>\nint main(void) { puts("hello c");\n'
                   ' FILE *f = fopen("out.txt", "w"); fputs("data c", f); fclose(f); return 0; }\n')),
    "cpp": ("c-cpp", ('#include <fstream>\n#include <iostream>\nint main() { std::cout << "hello cpp" << std::endl;\n'
                     ' std::ofstream("out.txt") << "data cpp"; return 0; }\n')),
    "php": ("php", "<?php\necho \"hello php\\n\";\nfile_put_contents('out.txt', 'data php');\n"),
    "rs": ("rust", 'fn main() { println!("hello rs"); std::fs::write("out.txt", "data rs").unwrap(); }\n'),
    "r": ("r", 'cat("hello r\\n")\nwriteLines("data r", "out.txt", sep = "")\n'),
    "f90": ("fortran", ("program hello\n  print '(a)', 'hello f90'\n"
                        "  open(10, file='out.txt', access='stream', status='replace')\n"
                        "  write(10) 'data f90'\n  close(10)\nend program hello\n")),
    "d": ("d", 'import std.stdio, std.file;\nvoid main() { writeln("hello d"); std.file.write("out.txt", "data d"); }\n'),
}
CORE = ("py", "js", "ts", "bash")
SLOW_TARGETS = {"go": "go", "java": "java", "c": "c-cpp", "cpp": "c-cpp", "php": "php", "rs": "rs",
                "r": "r", "f90": "f90", "d": "d"}


def smoke(lang: str) -> None:
    suffix, code = PROGRAMS[lang]
    with RunningContainer(pod_spec(containers.sidecar_image(suffix), env={"LANGUAGE": lang})) as c:
        health = wait_ready(c, "/health").json()
        assert health["language"] == lang and health["working_dir"] == "/mnt/data"
        wait_ready(c)
        r = httpx.post(c.url + "/execute", json={"code": code, "timeout": 60}, timeout=90)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["exit_code"] == 0, result
        assert result["stdout"].strip() == f"hello {lang}", result
        listing = httpx.get(c.url + "/files", timeout=10).json()["files"]
        assert "out.txt" in [f["name"] for f in listing], listing
        download = httpx.get(c.url + "/files/out.txt", timeout=10)
        assert download.status_code == 200 and download.text == f"data {lang}"
        # The run had no way out: no interface but loopback inside the container.
        routes = c.exec("cat", "/proc/net/route").stdout.strip().splitlines()
        assert len(routes) <= 1, routes  # only the header line
        assert c.exec("id", "-u").stdout.strip() == "65532"
        assert c.exec("touch", "/opt/x").returncode != 0  # read-only root


@pytest.mark.integration
@pytest.mark.parametrize("lang", CORE)
def test_core_language_image_smoke(core_images: str, lang: str) -> None:
    smoke(lang)


@pytest.fixture(scope="session")
def slow_images(podman_ready: None) -> str:
    return containers.build_images(*sorted(set(SLOW_TARGETS.values())), timeout=3600)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("lang", sorted(SLOW_TARGETS))
def test_other_language_image_smoke(slow_images: str, lang: str) -> None:
    smoke(lang)
