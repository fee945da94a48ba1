"""`podnet` entry point. Each command group lives in its own module with a
`register(subparsers)` function; errors reach the user as one line, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from podnet.errors import PodnetError
from podnet.store import credentials

# Modules under podnet.cli that add subcommands.
COMMAND_MODULES = ("objects", "ipam", "plan", "agent", "lab", "policy", "externaldns")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are reported like every other error: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(prog="podnet", description="Container networking for large Kubernetes clusters.")
    parser.add_argument(
        "--store",
        help="store URL: sqlite:///PATH, etcd://HOST:PORT[,HOST:PORT...] or etcds://... (TLS), "
        "optionally etcds://USER:PASSWORD@HOST:PORT (default: $PODNET_STORE or sqlite:///var/lib/podnet/podnet.db)",
    )
    credentials.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"podnet.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"podnet.cli.{name}":
                continue  # a command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PodnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
