"""The ``peftcore`` command line: ``inspect``, ``merge``, ``verify`` and ``convert`` adapters without writing code.

Exit codes: 0 success; 1 bad input or a refused operation (one ``peftcore: error: ...`` line on
stderr); 2 usage errors (argparse); 3 ``verify`` found a disagreement above tolerance.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from peftcore.errors import PeftcoreError

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from peftcore.cli import convert, inspect, merge, verify

    parser = argparse.ArgumentParser(
        prog="peftcore",
        description="Inspect, merge, verify and convert peft adapters (safetensors) without loading a model.",
        epilog="exit codes: 0 ok, 1 bad input or refused operation, 2 usage error, 3 verify disagreement",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (inspect, merge, verify, convert):
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peftcore`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    try:
        return args.run(args)
    except (PeftcoreError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"peftcore: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("peftcore: interrupted", file=sys.stderr)
        return 130
