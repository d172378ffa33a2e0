"""``kcr-trio serve | sidecar | bench | check``.

Each subcommand imports its module only when chosen, so ``kcr-trio sidecar`` in an execution pod
never loads the API server's dependencies.
"""

from __future__ import annotations

import sys

USAGE = """usage: kcr-trio <command> [options]

commands:
  serve     run the API server (embedded defaults when nothing is configured)
  sidecar   run the in-pod execution agent (same as `python -m sidecar`)
  bench     A/B benchmarks and conformance checks against running servers
  check     validate the configuration and the reachability of configured backends
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from kcr_trio.app import serve_main

        return serve_main(rest)
    if command == "sidecar":
        from sidecar.__main__ import main as sidecar_main

        return sidecar_main(rest)
    if command == "bench":
        from kcr_trio.bench.cli import main as bench_main

        return bench_main(rest)
    if command == "check":
        from kcr_trio.app import check_main

        return check_main(rest)
    print(f"kcr-trio: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
