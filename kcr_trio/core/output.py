"""What a run's raw output becomes in the ``/exec`` response (KubeCodeRun's rules, kept exactly).

Pure functions: easy to test, and the only place these rules live.
"""

from __future__ import annotations

import os
import re
import unicodedata

from .languages import SOURCE_FILES
from .model import GeneratedFile, RunResult
from .names import is_plain_filename

TRUNCATION_MARKER = "\n[Output truncated - size limit exceeded]"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Extensions KubeCodeRun never returns as generated files.
BLOCKED_EXTENSIONS = frozenset({".exe", ".bat", ".cmd", ".sh", ".ps1", ".scr", ".com"})
# Dropped outputs named per reason in stderr; beyond this, a count.
MAX_NAMED = 10


def clean_stream(text: str, limit: int) -> str:
    """Cap, drop control characters (keeping tab/newline/CR) and strip, as KubeCodeRun does."""
    if len(text) > limit:
        text = text[:limit] + TRUNCATION_MARKER
    return _CONTROL.sub("", text).strip()


def timeout_message(seconds: float) -> str:
    return f"Execution timed out after {seconds:g} seconds"


def shape_output(result: RunResult, *, limit: int, timeout: float) -> tuple[str, str]:
    """``(stdout, stderr)`` for the response.

    stdout gets a trailing newline when non-empty (LibreChat expects it); a failed run with silent
    stderr gets a readable reason, so the model always learns why nothing happened.
    """
    stdout = clean_stream(result.stdout, limit)
    stderr = clean_stream(result.stderr, limit)
    if stdout:
        stdout += "\n"
    if result.failure:
        if result.failure not in stderr:  # a sandbox may already have put its reason in stderr
            stderr = f"{stderr}\n{result.failure}".strip()
    elif result.timed_out and "timed out" not in stderr:
        stderr = f"{stderr}\n{timeout_message(timeout)}".strip()
    elif result.exit_code != 0 and not stderr:
        stderr = f"Code execution failed with exit code {result.exit_code}"
    return stdout, stderr


def _unsafe_name(name: str) -> bool:
    """Names we cannot hand back as they are: backslashes, control or format characters (bidi
    overrides such as U+202E would let ``txt.exe`` pose as ``exe.txt`` in a chat), or a path that
    is not plain components."""
    if "\\" in name or any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return True
    return not all(is_plain_filename(part) for part in name.split("/"))


def select_outputs(
    generated: list[GeneratedFile], *, max_files: int, max_bytes: int
) -> tuple[list[GeneratedFile], list[str]]:
    """Which generated files to store, and notes on the ones left out (for ``stderr``).

    KubeCodeRun drops files silently; we keep its filter but say what was left out, because a
    silently missing chart is the commonest "it said it saved the file" complaint. Files in
    subdirectories are returned under their relative path (``charts/plot.png``), which is how
    LibreChat names files under ``/mnt/data`` (librechat-newest-contract.md §4.4). Only the runner's
    own source files are left out without a word.
    """
    kept: list[GeneratedFile] = []
    dropped: dict[str, list[str]] = {}
    for item in sorted(generated, key=lambda g: g.name):
        name = item.name
        if name in SOURCE_FILES:
            continue
        reason = _not_an_output(name)
        if reason is not None:
            pass
        elif item.size > max_bytes:
            reason = f"larger than {max_bytes // 2**20}MB"
        elif len(kept) >= max_files:
            reason = f"more than {max_files} output files"
        else:
            kept.append(item)
            continue
        dropped.setdefault(reason, []).append(name)
    notes = []
    for reason, names in dropped.items():
        shown = ", ".join(ascii(n)[1:-1] if _unsafe_name(n) else n for n in names[:MAX_NAMED])
        more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
        noun = "Output file" if len(names) == 1 else "Output files"
        notes.append(f"{noun} {shown}{more} not saved: {reason}")
    return kept, notes


def _not_an_output(name: str) -> str | None:
    """Why a file the run left is not an output at all (never stored, whatever the limits)."""
    if _unsafe_name(name):
        return "its name has characters that cannot be returned safely"
    if any(part.startswith(".") for part in name.split("/")):
        return "hidden files are not returned"
    if os.path.splitext(name)[1].lower() in BLOCKED_EXTENSIONS:
        return "executable and script files are not returned"
    return None


def attempted_outputs(generated: list[GeneratedFile]) -> int:
    """How many of the generated files are outputs the run tried to deliver (contract §4.1's
    ``attempted``): everything but the runner's sources and the files that are never outputs
    (hidden, unsafe names, blocked types), which ``select_outputs`` notes but does not count as
    failed deliveries."""
    return sum(1 for g in generated if g.name not in SOURCE_FILES and _not_an_output(g.name) is None)
