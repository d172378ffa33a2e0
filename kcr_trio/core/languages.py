"""The languages the API accepts, and the source file each runs from.

LibreChat's ``execute_code`` tool offers ``py js ts c cpp java php rs go d f90 r bash``. KubeCodeRun
accepts the first twelve and answers ``bash`` with a 400; we run all thirteen (a documented,
compatible deviation). Codes match case-insensitively; aliases such as ``python`` are rejected, as
KubeCodeRun does, so a client that works here works there too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Language:
    code: str  # what the API accepts (lower case)
    name: str  # human name
    source_file: str  # the file the runner writes the program to, in the working directory
    env_suffix: str  # suffix of per-language settings: POD_POOL_<SUFFIX>, LANG_IMAGE_<SUFFIX>


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("py", "Python", "code.py", "PY"),
        Language("js", "JavaScript", "code.js", "JS"),
        Language("ts", "TypeScript", "code.ts", "TS"),
        Language("go", "Go", "main.go", "GO"),
        Language("java", "Java", "Code.java", "JAVA"),
        Language("c", "C", "code.c", "C"),
        Language("cpp", "C++", "code.cpp", "CPP"),
        Language("php", "PHP", "code.php", "PHP"),
        Language("rs", "Rust", "main.rs", "RS"),
        Language("r", "R", "code.r", "R"),
        Language("f90", "Fortran", "code.f90", "F90"),
        Language("d", "D", "code.d", "D"),
        Language("bash", "Bash", "code.sh", "BASH"),
    )
}

# Languages whose runs start with compile steps (their own time budget: KCR_COMPILE_TIMEOUT).
COMPILED = frozenset({"go", "java", "c", "cpp", "rs", "f90", "d"})

# The runner's own source files: never reported as generated output (KubeCodeRun main's exact set,
# plus ours for bash).
SOURCE_FILES = frozenset(lang.source_file for lang in LANGUAGES.values())


def lookup(code: str) -> Language | None:
    """The language for an API ``lang`` value, case-insensitively; ``None`` if unsupported."""
    return LANGUAGES.get(code.strip().lower()) if isinstance(code, str) else None
