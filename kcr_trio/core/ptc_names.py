"""Tool names → program identifiers for programmatic tool calling (contract §2.3).

These rules must match the client's ``normalizeToPythonIdentifier`` / ``normalizeToBashIdentifier``
exactly: the client checks collisions with them and tells the model the resulting names. Python
*deletes* dots, bash turns them into underscores. For bash the server's longer reserved list is
used (a superset of the client's; any superset is compatible, and it keeps tool functions from
shadowing the builtins the harness and the model's scripts rely on, such as ``wait`` and ``echo``).
"""

from __future__ import annotations

import keyword
import re

PYTHON_KEYWORDS = frozenset(keyword.kwlist)
BASH_RESERVED = frozenset({
    "if", "then", "else", "elif", "fi", "case", "esac", "for", "while", "until", "do", "done", "in",
    "function", "select", "time", "coproc", "declare", "typeset", "local", "readonly", "export", "unset",
    "return", "exit", "break", "continue", "shift", "alias", "unalias", "source", "echo", "printf", "read",
    "cd", "pwd", "kill", "trap", "wait", "eval", "exec", "jobs", "bg", "fg", "set", "let", "test", "true",
    "false",
})
_NOT_WORD = re.compile(r"[^A-Za-z0-9_]")


def python_identifier(name: str) -> str:
    ident = _NOT_WORD.sub("", re.sub(r"[-\s]", "_", name))
    if ident[:1].isdigit():
        ident = "_" + ident
    if ident in PYTHON_KEYWORDS:
        ident += "_tool"
    return ident


def bash_identifier(name: str) -> str:
    ident = _NOT_WORD.sub("", re.sub(r"[-\s.]", "_", name))
    if ident[:1].isdigit():
        ident = "_" + ident
    if not ident:
        ident = "tool"
    if ident in BASH_RESERVED or ident.startswith("_ptc_"):
        ident += "_tool"
    return ident


def identifiers(names: list[str], lang: str) -> dict[str, str]:
    """``{registered name: identifier}``; raises ``ValueError`` on an unusable name or a collision."""
    normalize = bash_identifier if lang == "bash" else python_identifier
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        ident = normalize(name)
        if not ident or ident.startswith("_kcr"):
            raise ValueError(f"Tool name {name!r} does not give a usable identifier")
        if ident in seen and seen[ident] != name:
            raise ValueError(f"Tool names {seen[ident]!r} and {name!r} both become {ident!r}")
        seen[ident] = name
        out[name] = ident
    return out
