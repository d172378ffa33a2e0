"""A small streaming ``multipart/form-data`` parser (no dependency, bounded memory).

``feed`` takes body chunks as they arrive and returns events; file bytes are handed out as soon as
they cannot be the start of a boundary, so an upload of any size needs only
``len(chunk) + len(boundary)`` bytes of buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    pass


@dataclass(slots=True)
class Part:
    name: str | None
    filename: str | None
    content_type: str | None


def boundary_of(content_type: str) -> bytes | None:
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not m or not content_type.lower().startswith("multipart/form-data"):
        return None
    return (m.group(1) or m.group(2)).encode("latin-1")


def _param(header: str, key: str) -> str | None:
    m = re.search(rf'(?:^|;)\s*{key}\*\s*=\s*([^;]+)', header, re.IGNORECASE)
    if m:  # RFC 5987: charset''percent-encoded
        from urllib.parse import unquote

        value = m.group(1).strip().strip('"')
        if "''" in value:
            charset, _, encoded = value.partition("''")
            return unquote(encoded, encoding=charset or "utf-8", errors="replace")
    m = re.search(rf'(?:^|;)\s*{key}\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))', header, re.IGNORECASE)
    if not m:
        return None
    if m.group(1) is not None:
        return re.sub(r"\\(.)", r"\1", m.group(1))
    return m.group(2).strip()


class Parser:
    def __init__(self, boundary: bytes) -> None:
        self.delim = b"--" + boundary
        self.buf = bytearray()
        self.state = "preamble"  # preamble | after_delim | headers | body | done

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        """Events: ``("part", Part)``, ``("data", bytes)``, ``("end", None)``, ``("done", None)``."""
        self.buf += data
        events: list[tuple[str, object]] = []
        while True:
            if self.state == "preamble":
                i = self.buf.find(self.delim)
                if i < 0:
                    del self.buf[: max(0, len(self.buf) - len(self.delim))]
                    return events
                del self.buf[: i + len(self.delim)]
                self.state = "after_delim"
            elif self.state == "after_delim":
                if len(self.buf) < 2:
                    return events
                if self.buf[:2] == b"--":
                    self.state = "done"
                    events.append(("done", None))
                    return events
                if self.buf[:2] != b"\r\n":
                    raise MultipartError("malformed multipart boundary")
                del self.buf[:2]
                self.state = "headers"
            elif self.state == "headers":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self.buf) > MAX_HEADER_BYTES:
                        raise MultipartError("multipart part headers too large")
                    return events
                raw = bytes(self.buf[:i]).decode("utf-8", "replace")
                del self.buf[: i + 4]
                headers: dict[str, str] = {}
                for line in raw.split("\r\n"):
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                disp = headers.get("content-disposition", "")
                events.append(("part", Part(_param(disp, "name"), _param(disp, "filename"),
                                            headers.get("content-type"))))
                self.state = "body"
            elif self.state == "body":
                marker = b"\r\n" + self.delim
                i = self.buf.find(marker)
                if i < 0:
                    keep = len(marker) - 1
                    if len(self.buf) > keep:
                        events.append(("data", bytes(self.buf[: len(self.buf) - keep])))
                        del self.buf[: len(self.buf) - keep]
                    return events
                if i:
                    events.append(("data", bytes(self.buf[:i])))
                del self.buf[: i + len(marker)]
                events.append(("end", None))
                self.state = "after_delim"
            else:
                self.buf.clear()
                return events
