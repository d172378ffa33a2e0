"""Which of the 13 languages this machine can run, and what to install for the others.

Why: after a plain ``pip install .`` only Python and bash are sure to be there. A language whose
toolchain is missing used to fail inside the run (TypeScript: a Node stack trace, ``Cannot find
module 'typescript'``). The local executor checks once at start-up, lists every language as
available or not (with the reason) in ``/ready``, and answers a clear error naming what to install
instead of starting a sandbox that cannot work.
"""

from __future__ import annotations

import os

from .languages import LANGUAGES, Toolchain

# (tools that must all be on the fixed PATH, alternatives of which one is enough, how to install)
_NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "js": (("node",), (), "Node.js (Debian: apt-get install nodejs)"),
    "ts": (("node",), (), ("Node.js and the TypeScript package (apt-get install nodejs npm && "
                          "npm install -g typescript, or point KCR_LOCAL_NODE_PATH at a "
                          "node_modules directory that contains typescript)")),
    "go": (("go",), (), "Go (apt-get install golang-go)"),
    "java": (("javac", "java"), (), "a JDK (apt-get install default-jdk-headless)"),
    "c": (("gcc",), (), "GCC (apt-get install gcc libc6-dev)"),
    "cpp": (("g++",), (), "G++ (apt-get install g++)"),
    "php": (("php",), (), "PHP (apt-get install php-cli)"),
    "rs": (("rustc", "cc"), (), "Rust (apt-get install rustc gcc)"),
    "r": (("Rscript",), (), "R (apt-get install r-base-core)"),
    "f90": (("gfortran",), (), "gfortran (apt-get install gfortran)"),
    "d": ((), ("ldc2", "gdc"), "a D compiler (apt-get install ldc, or gdc)"),
    "bash": (("bash",), (), "bash"),
}


def typescript_dir(node_path: str) -> str | None:
    """The ``typescript`` package directory Node would find on ``node_path``, if any."""
    for entry in node_path.split(":"):
        if entry and os.path.isfile(os.path.join(entry, "typescript", "package.json")):
            return os.path.join(entry, "typescript")
    return None


def unavailable_reason(code: str, tools: Toolchain) -> str | None:
    """``None`` when ``code`` can run here, else a sentence saying what is missing and how to
    install it (shown in ``/ready`` and in the error ``/exec`` answers)."""
    if code not in LANGUAGES:
        return f"unknown language {code!r}"
    if code == "py":
        if os.path.isabs(tools.python) and os.access(tools.python, os.X_OK):
            return None
        return f"no Python interpreter found ({tools.python}); install python3 or set KCR_LOCAL_PYTHON"
    required, any_of, install = _NEEDS[code]
    missing = [t for t in required if not tools.has(t)]
    if any_of and not any(tools.has(t) for t in any_of):
        missing.append(" or ".join(any_of))
    if missing:
        return f"{', '.join(missing)} not found on the PATH; install {install}"
    if code == "ts" and typescript_dir(tools.node_path) is None:
        return (f"the Node package 'typescript' was not found on NODE_PATH ({tools.node_path}); "
                f"install {install}")
    return None


def availability(tools: Toolchain) -> dict[str, str | None]:
    """``{language: None | reason}`` for all 13 languages (blocking: a few ``stat`` calls)."""
    return {code: unavailable_reason(code, tools) for code in LANGUAGES}
