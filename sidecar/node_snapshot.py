"""A Node start-up snapshot for the pre-warmed JavaScript interpreter: same program, less CPU.

Why: the Node heap cap (``--max-old-space-size``, see ``languages.py``) is a V8 flag, and any
non-default V8 flag changes V8's flag hash, so Node rejects the code cache embedded in its binary
for every built-in module and compiles them from source at each start (``--profile-deserialization``
prints "Cached code failed check" ~30 times). Measured here with the pre-warm bootstrap and a
handshake, CPU per start (rusage, medians of 40, interleaved): 35.7 ms with the cap, 28.4 ms
without it. A user-land snapshot (``node --build-snapshot``, Node >= 18.20) built *with the same
flags* carries its own code cache for the built-ins it loaded, which V8 accepts: ~3.5 ms less per
start while the cap, the program and its result stay exactly as before. The snapshot holds only
Node's own state after ``require('fs')``/``require('path')``; nothing of any run.

The blob is built once per directory (the local executor passes its server directory, so every js
sidecar of a server shares one; a build costs ~0.2 s of CPU) and is keyed by everything that must
match at run time (node binary, its version, the flags, the bootstrap source): V8 refuses a blob
built with other flags. Any failure means "no snapshot": the interpreter then starts as before
(``node -e NODE_BOOT``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile

from .languages import NODE_BOOT

# The deserialized main function runs NODE_BOOT with the same argv as `node -e NODE_BOOT -- ...`
# (process.argv = [node, mode, fd, file, ...args]). `require` here is the snapshot builder's own,
# which serves built-in modules only: enough for NODE_BOOT in js mode (ts needs the typescript
# package and keeps `node -e`). The snapshot flags are dropped from execArgv so that a program's
# child_process.fork() starts a plain Node with the heap cap, not this bootstrap.
ENTRY = (
    "const fs = require('fs'), path = require('path');\n"
    "require('v8').startupSnapshot.setDeserializeMainFunction(() => {\n"
    "  const i = process.execArgv.indexOf('--snapshot-blob');\n"
    "  if (i >= 0) process.execArgv.splice(i, 2);\n"
    + NODE_BOOT +
    "});\n"
)


def _key(node: str, flags: list[str]) -> str:
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30,
                                 env={"PATH": "/usr/bin:/bin"}).stdout.strip()
        st = os.stat(node)
    except (OSError, subprocess.SubprocessError):
        return ""
    if not version:
        return ""
    ident = "\0".join([os.path.realpath(node), version, str(st.st_size), str(st.st_mtime_ns), *flags, ENTRY])
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def ensure(directory: str, node: str, flags: list[str], timeout: float = 60.0) -> str | None:
    """The path of a snapshot blob for ``node`` with ``flags`` in ``directory`` (built now if
    missing; atomic, so concurrent builders never see half a file), or None if it cannot be built.
    Blocking. The blob is root-owned and read-only: runs reach it through a hard link."""
    key = _key(node, flags)
    if not key:
        return None
    blob = os.path.join(directory, f"node-{key}.blob")
    if os.path.isfile(blob):
        return blob
    try:
        work = tempfile.mkdtemp(prefix=".node-snapshot-", dir=directory)
    except OSError:
        return None
    try:
        entry = os.path.join(work, "entry.js")
        with open(entry, "w") as fh:
            fh.write(ENTRY)
        out = os.path.join(work, "out.blob")
        done = subprocess.run([node, *flags, "--snapshot-blob", out, "--build-snapshot", entry],
                              cwd=work, capture_output=True, timeout=timeout,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        if done.returncode != 0 or not os.path.isfile(out):
            return None
        os.chmod(out, 0o444)
        os.replace(out, blob)
        return blob
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        for name in ("entry.js", "out.blob"):
            try:
                os.unlink(os.path.join(work, name))
            except OSError:
                pass
        try:
            os.rmdir(work)
        except OSError:
            pass
