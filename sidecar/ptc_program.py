"""Programmatic tool calling: turn ``(language, user code, tools)`` into the program the runner runs.

The API server decides the identifiers (contract §2.3, ``kcr_trio.core.ptc_names``) and sends
``tools`` as ``[{"name": <registered name>, "ident": <identifier>, "description", "params":
[{"name", "required"}]}]``. Identifiers are re-checked here because they become source text.

Python (§2.4): ``ptc_harness.py`` + one keyword-only ``async def`` per tool + the user's code wrapped
in ``async def __user_main__()`` (every non-blank line indented four spaces, as the official wrapper
does), run with ``asyncio.run``. Parameters that are not usable Python names still pass through
``**kwargs``; ``None`` values are dropped from the input, as the official stub does.

bash (§2.9): ``BASH_HARNESS`` + one shell function per tool taking one JSON object string and
printing the result as one compact JSON value (``jq -c``); an ``is_error`` result writes the message
to stderr and ends the whole script with status 1 (from a subshell or background job it signals
the main shell first).
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Any

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PYTHON_HARNESS = Path(__file__).with_name("ptc_harness.py").read_text(encoding="utf-8")

BASH_HARNESS = r"""# kcr-trio programmatic tool calling: bash runtime (sidecar/ptc_program.py)
_kcr_ptc_dir="$PWD/$_kcr_ptc_name"
_kcr_ptc_main=$$
trap 'exit 1' USR1
_kcr_ptc_call() {
  local _kcr_name="$1" _kcr_input="${2-}" _kcr_id _kcr_fd _kcr_line _kcr_answer
  if [ -z "$_kcr_input" ]; then _kcr_input='{}'; fi
  if ! _kcr_input=$(printf '%s' "$_kcr_input" | jq -ce 'if type == "object" then . else error("object expected") end' 2>/dev/null); then
    printf '%s: expects one JSON object argument, e.g. %s '"'"'{"key":"value"}'"'"'\n' "$_kcr_name" "$_kcr_name" >&2
    return 2
  fi
  _kcr_id="b${BASHPID}_${RANDOM}${RANDOM}"
  printf '%s' "$_kcr_input" | jq -c --arg n "$_kcr_name" --arg r "r.$_kcr_id" '{reply: $r, calls: [{name: $n, input: .}]}' > "$_kcr_ptc_dir/t.$_kcr_id"
  mv -f "$_kcr_ptc_dir/t.$_kcr_id" "$_kcr_ptc_dir/q.$_kcr_id"
  mkfifo -m 600 "$_kcr_ptc_dir/r.$_kcr_id"
  exec {_kcr_fd}<>"$_kcr_ptc_dir/r.$_kcr_id"
  printf '%s\n' "$_kcr_id" > "$_kcr_ptc_dir/in"
  read -r -u "$_kcr_fd" _kcr_line
  exec {_kcr_fd}>&-
  rm -f "$_kcr_ptc_dir/r.$_kcr_id"
  _kcr_answer="$_kcr_ptc_dir/a.$_kcr_id"
  if [ "$(jq -r '.results[0].is_error' "$_kcr_answer")" = "true" ]; then
    jq -r '.results[0].error_message // "tool execution failed"' "$_kcr_answer" >&2
    rm -f "$_kcr_answer"
    if [ "$BASHPID" != "$_kcr_ptc_main" ]; then kill -USR1 "$_kcr_ptc_main" 2>/dev/null; fi
    exit 1
  fi
  jq -c '.results[0].result' "$_kcr_answer"
  rm -f "$_kcr_answer"
}
"""


class ProgramError(ValueError):
    """The tool list cannot be turned into a program (a bad identifier)."""


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ProgramError("tools must be a list")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise ProgramError("each tool needs a name")
        ident = tool.get("ident")
        if not isinstance(ident, str) or not _IDENT.match(ident) or ident.startswith("_kcr"):
            raise ProgramError(f"bad identifier for tool {tool['name']!r}")
        out.append(tool)
    return out


def python_program(code: str, tools: Any, channel: str = ".kcr-ptc") -> str:
    parts = [f"_KCR_CHANNEL_NAME = {channel!r}", PYTHON_HARNESS, ""]
    for tool in _tools(tools):
        params = [p for p in tool.get("params") or [] if isinstance(p, dict) and isinstance(p.get("name"), str)]
        usable = [p for p in params if _IDENT.match(p["name"]) and not keyword.iskeyword(p["name"])
                  and not p["name"].startswith("_kcr")]
        required = [p["name"] for p in usable if p.get("required")]
        optional = [p["name"] for p in usable if not p.get("required")]
        named_params = [*required, *(f"{n}=None" for n in optional)]
        signature = ", ".join(["*", *named_params, "**_kcr_extra"] if named_params else ["**_kcr_extra"])
        named = ", ".join(f"{n!r}: {n}" for n in required + optional)
        doc = str(tool.get("description") or tool["name"])
        parts.append(f"async def {tool['ident']}({signature}):\n"
                     f"    {doc!r}\n"
                     f"    return await _kcr_channel.call({tool['name']!r}, _kcr_args({{{named}}}, _kcr_extra))\n")
    body = "\n".join(("    " + line) if line.strip() else "" for line in code.split("\n"))
    parts.append('async def __user_main__():\n    """The model\'s code; top-level await works."""\n'
                 f"{body}\n    pass\n\n\n_kcr_main(__user_main__)\n")
    return "\n".join(parts)


def bash_program(code: str, tools: Any, channel: str = ".kcr-ptc") -> str:
    if not _IDENT.match(channel.replace(".", "_").replace("-", "_")):
        raise ProgramError("bad channel name")
    parts = [f"_kcr_ptc_name='{channel}'", BASH_HARNESS]
    for tool in _tools(tools):
        quoted = "'" + tool["name"].replace("'", "'\"'\"'") + "'"
        parts.append(f'{tool["ident"]}() {{ _kcr_ptc_call {quoted} "$@"; }}')
    parts.append(code)
    return "\n".join(parts) + "\n"


def build(lang: str, code: str, tools: Any, channel: str = ".kcr-ptc") -> str:
    """The program for one run; ``channel`` is the run's own directory name in the working dir."""
    if lang == "bash":
        return bash_program(code, tools, channel)
    return python_program(code, tools, channel)
