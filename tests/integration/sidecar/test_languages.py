"""Every language runs real code through a real sidecar; compiled ones report compile errors.

One sidecar per language; compiled languages compile twice at most (hello + a compile error, which
fails fast before linking). Slow toolchains are marked ``slow`` but still run in CI.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.sidecar import running_sidecar

HELLO = {
    "py": ("import sys\nprint('hello from py', sys.version_info[0])", "hello from py 3\n"),
    "js": ("console.log('hello from js', [1,2].map(x => x * 2).join(','))", "hello from js 2,4\n"),
    "ts": ("const n: number = 21;\ninterface P { x: number }\nconst p: P = { x: n * 2 };\n"
           "console.log(`hello from ts ${p.x}`);", "hello from ts 42\n"),
    "go": ('package main\nimport "fmt"\nfunc main() { fmt.Println("hello from go", 6*7) }\n', "hello from go 42\n"),
    "java": ('public class Code {\n  public static void main(String[] a) {\n'
             '    System.out.println("hello from java " + (6*7));\n  }\n}\n', "hello from java 42\n"),
    "c": ('#include <stdio.h>\n#include <math.h>\nint main(void) { printf("hello from c %d\\n", (int)sqrt(1764.0)); return 0; }\n',
          "hello from c 42\n"),
    "cpp": ('#include <iostream>\n#include <vector>\nint main() { std::vector<int> v{6, 7};\n'
            '  std::cout << "hello from cpp " << v[0] * v[1] << std::endl; }\n', "hello from cpp 42\n"),
    "php": ('<?php\necho "hello from php " . (6 * 7) . "\\n";\n', "hello from php 42\n"),
    "rs": ('fn main() {\n    let v: Vec<i32> = vec![6, 7];\n    println!("hello from rs {}", v[0] * v[1]);\n}\n',
           "hello from rs 42\n"),
    "r": ('cat("hello from r", 6 * 7, "\\n")\n', "hello from r 42 \n"),
    "f90": ("program hello\n  print '(A,I0)', 'hello from f90 ', 6 * 7\nend program hello\n", "hello from f90 42\n"),
    "d": ('import std.stdio;\nvoid main() { writeln("hello from d ", 6 * 7); }\n', "hello from d 42\n"),
    "bash": ('echo "hello from bash $((6 * 7))"', "hello from bash 42\n"),
}

COMPILE_ERROR = {
    "ts": "let x: number = ;\n",
    "go": "package main\nfunc main() { undefined_function() }\n",
    "java": "public class Code { public static void main(String[] a) { int x = \"s\"; } }\n",
    "c": "int main(void) { return undefined_thing; }\n",
    "cpp": "int main() { undefined_thing(); }\n",
    "rs": "fn main() { let x: i32 = \"s\"; }\n",
    "f90": "program p\n  call\nend program p\n",
    "d": "void main() { undefined_thing(); }\n",
}

SLOW = {"go", "java", "rs", "d", "f90", "cpp", "c", "ts", "r"}


def _param(lang: str):  # type: ignore[no-untyped-def]
    return pytest.param(lang, marks=pytest.mark.slow) if lang in SLOW else lang


@pytest.mark.parametrize("lang", [_param(lang) for lang in HELLO])
async def test_language_runs_real_code(lang: str) -> None:
    code, expected = HELLO[lang]
    async with running_sidecar(lang) as sc, httpx.AsyncClient(base_url=sc.url, timeout=180) as client:
        res = (await client.post("/execute", json={"code": code, "timeout": 120})).json()
        assert res["exit_code"] == 0, res["stderr"]
        assert res["stdout"] == expected
        assert res["generated"] == [], res["generated"]  # no binaries or class files in the working dir
        if lang in COMPILE_ERROR:
            res = (await client.post("/execute", json={"code": COMPILE_ERROR[lang], "timeout": 120})).json()
            assert res["exit_code"] != 0 and res["timed_out"] is False
            assert res["stderr"].strip(), "a compile error must be reported on stderr"
            assert res["stdout"] == ""


PROBES = {
    "py": ("import sys, os\nprint(__name__, sys.argv, os.path.basename(__file__), sys.path[0] == os.getcwd())\n"
           "import atexit\natexit.register(lambda: print('atexit ran'))\n"
           "f = open('left_open.txt', 'w')\nf.write('flushed at exit')\n"
           "class Holder:\n    g = open('in_a_cycle.txt', 'w')\nHolder.g.write('collected at exit')\n"),
    "js": "console.log(require.main === module, process.argv.length, require('path').basename(__filename))",
    "ts": "const m: boolean = require.main === module;\nconsole.log(m, require('path').basename(__filename))",
    "bash": 'echo "$0" "$#"; exit 3',
}


@pytest.mark.parametrize("lang", ["py", "js", "ts", "bash"])
async def test_prewarmed_run_behaves_like_a_cold_run(lang: str) -> None:
    outputs = []
    for prewarm in ("true", "false"):
        async with running_sidecar(lang, "--prewarm", prewarm) as sc, \
                httpx.AsyncClient(base_url=sc.url, timeout=60) as client:
            res = (await client.post("/execute", json={"code": PROBES[lang], "timeout": 30})).json()
            outputs.append((res["exit_code"], res["stdout"], res["stderr"], res["generated"]))
            if lang == "py":
                assert Path(sc.working_dir, "left_open.txt").read_text() == "flushed at exit"
                assert Path(sc.working_dir, "in_a_cycle.txt").read_text() == "collected at exit"
    assert outputs[0] == outputs[1]
    if lang == "py":
        assert outputs[0][1] == "__main__ ['code.py'] code.py True\natexit ran\n"
    if lang == "js":
        assert outputs[0][1] == "true 2 code.js\n"
    if lang == "bash":
        assert outputs[0][:2] == (3, "code.sh 0\n")
