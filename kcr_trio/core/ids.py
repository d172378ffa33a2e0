"""Identifiers: 21-character nanoid-style ids, as KubeCodeRun and LibreChat expect.

Session, file and request ids share one format: 21 characters from ``[A-Za-z0-9_-]`` whose first and
last characters are alphanumeric. The alphanumeric ends make every id a valid Kubernetes label value
(KubeCodeRun labels pods with them), and the absence of ``.`` matters because LibreChat's fallback
parser splits ``"<sid>/<fid>.<ext>"`` on the first dot.
"""

from __future__ import annotations

import re
import secrets

ID_LENGTH = 21
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ALPHABET = _ALNUM + "_-"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{19}[A-Za-z0-9]$")
# What callers may send us as an id: the shape LibreChat validates, nothing that can traverse paths.
LOOSE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_id() -> str:
    """A fresh 21-character id (about 124 bits of randomness)."""
    middle = "".join(secrets.choice(_ALPHABET) for _ in range(ID_LENGTH - 2))
    return secrets.choice(_ALNUM) + middle + secrets.choice(_ALNUM)


def is_id(value: str) -> bool:
    """True for ids we mint ourselves (exact format)."""
    return bool(ID_RE.match(value))


def is_safe_id(value: str) -> bool:
    """True for any id-like string that is safe to use as a key or path component."""
    return bool(LOOSE_ID_RE.match(value))
