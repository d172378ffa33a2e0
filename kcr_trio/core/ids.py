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
# byte -> _ALPHABET[byte & 63]: one ``bytes.translate`` per id instead of a Python loop.
_MIDDLE = bytes(ord(_ALPHABET[b & 63]) for b in range(256))
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{19}[A-Za-z0-9]$")
# What callers may send us as an id: the shape LibreChat validates, nothing that can traverse paths.
LOOSE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_id() -> str:
    """A fresh 21-character id (about 120 bits of randomness).

    One ``token_bytes`` call per id (not one per character): ids are minted on every request.
    64 and 62 do not divide 256, so take each byte modulo a power of two (64 for the middle, whose
    alphabet has exactly 64 symbols) and draw the alphanumeric ends by rejection-free scaling of two
    bytes, which keeps the bias below 0.1 %.
    """
    raw = secrets.token_bytes(ID_LENGTH + 2)
    middle = raw[1 : ID_LENGTH - 1].translate(_MIDDLE).decode("ascii")  # _ALPHABET[b & 63], in C
    first = _ALNUM[int.from_bytes(raw[0:1] + raw[-2:-1], "big") % 62]
    last = _ALNUM[int.from_bytes(raw[ID_LENGTH - 1 : ID_LENGTH] + raw[-1:], "big") % 62]
    return first + middle + last


def is_id(value: str) -> bool:
    """True for ids we mint ourselves (exact format)."""
    return bool(ID_RE.match(value))


def is_safe_id(value: str) -> bool:
    """True for any id-like string that is safe to use as a key or path component."""
    return bool(LOOSE_ID_RE.match(value))
