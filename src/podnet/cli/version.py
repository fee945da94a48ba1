"""`podnet version` (and `podnet --version`): the installed package's version."""

from __future__ import annotations

import argparse
import platform

from podnet.cli.output import add_output_flag, emit, is_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print podnet's version")
    add_output_flag(p)
    p.set_defaults(func=cmd_version)


def package_version() -> str:
    """The installed distribution's version; the source tree's when podnet runs uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("podnet")
    except PackageNotFoundError:
        from podnet import __version__

        return __version__


def version_info() -> dict[str, str]:
    return {"podnet": package_version(), "python": platform.python_version()}


def version_text() -> str:
    info = version_info()
    return f"podnet {info['podnet']} (Python {info['python']})"


def cmd_version(args: argparse.Namespace) -> int:
    if is_table(args.output):
        print(version_text())
    else:
        emit(version_info(), args.output)
    return 0
