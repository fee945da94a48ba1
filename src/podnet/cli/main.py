"""`podnet` entry point. Each command group lives in its own module with a
`register(subparsers)` function; errors reach the user as one line, never a traceback.

Global flags (`add_global_flags`: the store and how to reach it) are defined once and
accepted before or after the command: `podnet --store URL get svc` and `podnet get svc
--store URL` are the same, and when both are given the later one wins. Exit codes are
the same for every command: 0 ok, 1 error, 2 usage, 3 "ran fine and found something"
(podnet.cli.output)."""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import NoReturn

from podnet.cli.output import EXIT_ERROR, EXIT_USAGE
from podnet.errors import PodnetError
from podnet.store import credentials

# Modules under podnet.cli that add subcommands.
COMMAND_MODULES = ("objects", "ipam", "plan", "agent", "dns", "node", "bgp", "lab", "policy", "externaldns", "kube", "version")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are reported like every other error: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every command takes, before or after its name: the one place they are defined."""
    parser.add_argument(
        "--store",
        help="store URL: sqlite:///PATH, etcd://HOST:PORT[,HOST:PORT...] or etcds://... (TLS), "
        "optionally etcds://USER:PASSWORD@HOST:PORT (default: $PODNET_STORE or sqlite:///var/lib/podnet/podnet.db)",
    )
    credentials.add_arguments(parser)


GLOBAL_GROUP = "global options (also before the command)"


def _spread_global_flags(parser: argparse.ArgumentParser, flags: list[argparse.Action]) -> None:
    """Give every command and subcommand under `parser` the global flags, defaulting to
    "not given" (SUPPRESS) so a value given before the command is not overwritten by the
    subcommand's default. An option string a command defines itself stays its own (`podnet
    delete --key` is an object key; etcd's --key goes before `delete` there)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in {id(p): p for p in action.choices.values()}.values():
            group = None
            for flag in flags:
                free = [o for o in flag.option_strings if o not in sub._option_string_actions]
                if not free:
                    continue
                clone = copy.copy(flag)
                clone.option_strings, clone.default, clone.required = free, argparse.SUPPRESS, False
                group = group or sub.add_argument_group(GLOBAL_GROUP)
                group._add_action(clone)
            _spread_global_flags(sub, flags)


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        from podnet.cli.version import version_text

        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(prog="podnet", description="Container networking for large Kubernetes clusters.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print podnet's version and exit")
    add_global_flags(parser)
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
    template = argparse.ArgumentParser(add_help=False)
    add_global_flags(template)
    _spread_global_flags(parser, template._actions)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PodnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file or socket the command was given: the OS's reason, and the name
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug; still one line (PODNET_TRACEBACK=1 shows where)
        if os.environ.get("PODNET_TRACEBACK"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (PODNET_TRACEBACK=1 shows where)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
