"""File names: sanitisation (as LibreChat and KubeCodeRun do it), download headers, content types."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import unicodedata
from urllib.parse import quote

_UNSAFE = re.compile(r"[^a-zA-Z0-9.-]")
MAX_NAME = 255

# Types Python's table lacks or gets wrong on minimal images.
_EXTRA_TYPES = {
    ".csv": "text/csv",
    ".md": "text/markdown",
    ".json": "application/json",
    ".parquet": "application/vnd.apache.parquet",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".ts": "text/plain",
    ".py": "text/x-python",
    ".r": "text/plain",
}


def _keep(char: str) -> bool:
    """LibreChat's ``[a-zA-Z0-9.-]`` for ASCII; beyond ASCII, letters, marks and digits only."""
    if char.isascii():
        return char.isalnum() or char in ".-"
    return unicodedata.category(char)[0] in "LMN"


def sanitize_filename(name: str) -> str:
    """The name a file gets in ``/mnt/data``: LibreChat's ``sanitizeFilename`` rules, Unicode kept.

    Basename only; every ASCII character outside ``[a-zA-Z0-9.-]`` becomes ``_`` exactly as in
    LibreChat and KubeCodeRun. Non-ASCII letters, marks and digits are kept (NFC), so ``数据.csv``
    and ``报告.csv`` stay two files named as LibreChat shows them to the model, instead of both
    collapsing to ``__.csv``; every other non-ASCII character (spaces, symbols, emoji, bidi controls
    such as U+202E) becomes ``_``. A leading ``.`` or an empty result gets a ``_`` prefix. Names
    over 255 UTF-8 bytes (the filesystem's limit) are cut on a character boundary and given a short
    hash, keeping the extension. The result can never traverse a path or hide as a dot-file.
    """
    base = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    clean = "".join(c if _keep(c) else "_" for c in base)
    if not clean or clean.startswith("."):
        clean = "_" + clean
    if len(clean.encode("utf-8")) > MAX_NAME:
        stem, ext = os.path.splitext(clean)
        if len(ext.encode("utf-8")) > 32:
            stem, ext = clean, ""
        digest = hashlib.sha256(clean.encode()).hexdigest()[:6]
        room = MAX_NAME - len(ext.encode("utf-8")) - 7
        stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
        clean = stem + "-" + digest + ext
    return clean


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem-2.ext``, ``stem-3.ext`` … : the first one not in ``taken`` (≤ 255 bytes)."""
    if name not in taken:
        return name
    stem, ext = os.path.splitext(name)
    n = 2
    while True:
        suffix = f"-{n}{ext}"
        room = MAX_NAME - len(suffix.encode("utf-8"))
        candidate = stem.encode("utf-8")[:room].decode("utf-8", "ignore") + suffix
        if candidate not in taken:
            return candidate
        n += 1


def is_plain_filename(name: str) -> bool:
    """True if ``name`` is a single path component: no separators, NULs, ``.`` or ``..``."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME
    )


def guess_content_type(filename: str, stored: str | None = None) -> str:
    """The stored type unless it is missing or generic; then a guess from the extension."""
    if stored and stored != "application/octet-stream":
        return stored
    ext = os.path.splitext(filename)[1].lower()
    if ext in _EXTRA_TYPES:
        return _EXTRA_TYPES[ext]
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename=`` fallback and an RFC 5987 ``filename*=``."""
    base = os.path.basename(filename) or "download"
    ascii_name = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    ascii_name = re.sub(r"[^-_.A-Za-z0-9]", "_", ascii_name.replace(" ", "_")) or "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base, safe='')}"
