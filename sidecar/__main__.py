"""``python -m sidecar`` / ``kcr-trio sidecar``: run the execution agent."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .config import parse
    from .server import main as serve_main

    cfg = parse(sys.argv[1:] if argv is None else argv)
    return serve_main(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
