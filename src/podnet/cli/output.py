"""What every command prints, one way: `-o table|wide|yaml|json`, one table printer
(kubectl's look: upper-case headers, columns padded with three spaces, `<none>` for an
empty value), JSON and YAML of the same data, and the exit codes.

A command that prints objects or a report calls `add_output_flag(parser)` and then, once
it has its data, either `emit(data, args.output)` (JSON/YAML) or its table through
`table(columns, rows, wide=args.output == "wide")`. Columns marked `wide=True` appear
only with `-o wide`, as in `kubectl get -o wide`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

# Exit codes, the same for every command.
EXIT_OK = 0  # it ran, and found nothing to report
EXIT_ERROR = 1  # it could not do what was asked (one line on stderr says why)
EXIT_USAGE = 2  # the command line is wrong (argparse)
EXIT_FOUND = 3  # it ran fine and found something: `ipam check` problems, `plan --strict` warnings,
#                 `policy explain` denied, `lab probe` paths not as expected

FORMATS = ("table", "wide", "yaml", "json")
TABLES = ("table", "wide")
NONE = "<none>"
GAP = "   "  # between columns, as kubectl's printer pads them


def add_output_flag(parser: argparse.ArgumentParser, *, aliases: Mapping[str, str] | None = None,
                    json_flag: bool = False) -> None:
    """`-o/--output table|wide|yaml|json` (default table). `aliases` maps old values of
    -o to new ones (policy explain's `text` is `table`); `json_flag` keeps an old `--json`
    working as `-o json`. Both still work and say once, on stderr, what to use instead."""
    old = dict(aliases or {})

    def output(value: str) -> str:
        if value in old:
            _deprecated(f"-o {value}", f"-o {old[value]}")
            return old[value]
        return value

    parser.add_argument("-o", "--output", type=output, choices=FORMATS, default="table", metavar="FORMAT",
                        help="table, wide (the table with more columns), yaml or json (default table)")
    if json_flag:
        parser.add_argument("--json", action=_JsonFlag, nargs=0, dest="output", help=argparse.SUPPRESS)


class _JsonFlag(argparse.Action):
    """The old `--json` of `ipam` and `plan`: `-o json`."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        _deprecated(option_string or "--json", "-o json")
        setattr(namespace, self.dest, "json")


def _deprecated(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated: use {new}", file=sys.stderr)


def is_table(fmt: str) -> bool:
    return fmt in TABLES


def emit(data: Any, fmt: str, out: IO[str] | None = None) -> None:
    """`data` (JSON-shaped: dicts, lists, strings, numbers, booleans, None) as JSON or YAML."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    elif fmt == "yaml":
        import yaml

        # Through JSON first, so YAML holds exactly what JSON does (tuples become lists).
        yaml.safe_dump(json.loads(json.dumps(data)), out, sort_keys=False, default_flow_style=False)
    else:
        raise ValueError(f"emit: {fmt!r} is not json or yaml")


@dataclass(frozen=True)
class Column:
    """One column: its header, how to get the cell from a row, whether only `-o wide` shows
    it, and what an empty cell reads (`<none>`, or "" where blank means "nothing to say")."""

    header: str
    get: Callable[[Any], Any]
    wide: bool = False
    empty: str = NONE


def cell(value: Any, empty: str = NONE) -> str:
    """A cell's text: None, "" and empty collections are `empty`; booleans lower case;
    lists joined with commas."""
    if value is None or value == "" or (isinstance(value, (list, tuple, set, frozenset, dict)) and not value):
        return empty
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v, empty) for v in value)
    return str(value)


def table(columns: Sequence[Column], rows: Iterable[Any], *, wide: bool = False, indent: str = "") -> str:
    """The rows as a table under upper-case headers, each column as wide as its widest
    cell; trailing blanks trimmed. With no rows, the headers alone."""
    cols = [c for c in columns if wide or not c.wide]
    cells = [[c.header.upper() for c in cols]]
    cells += [[cell(c.get(r), c.empty) for c in cols] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return "\n".join(indent + GAP.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def print_table(columns: Sequence[Column], rows: Iterable[Any], *, wide: bool = False, indent: str = "") -> None:
    print(table(columns, rows, wide=wide, indent=indent))
