"""Installs the CNI plugin executable `podnet-cni` into a CNI bin directory.

The executable is plugin.py itself behind a shebang naming the interpreter with
`-IS` (isolated mode, no site): it starts without site-packages or the podnet
package. Linux passes everything after the interpreter path as one argument, so
the flags are written as one cluster (`-I -S` would reach Python as one bad
option).

    python -m podnet.cni.install DIR
"""

from __future__ import annotations

import os
import sys
import tempfile

PLUGIN_NAME = "podnet-cni"
SHEBANG_LIMIT = 255  # bytes the kernel reads of a #! line (BINPRM_BUF_SIZE 256, less the newline)


def plugin_source() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py"), encoding="utf-8") as f:
        return f.read()


def install_plugin(bin_dir: str, python: str = sys.executable) -> str:
    """Write bin_dir/podnet-cni (mode 755) atomically; returns its path."""
    python = os.path.abspath(python)
    shebang = f"#!{python} -IS\n"
    if len(shebang.encode()) - 1 > SHEBANG_LIMIT or any(c.isspace() for c in python):
        raise ValueError(f"interpreter path {python!r} cannot be used in a #! line "
                         f"(at most {SHEBANG_LIMIT - 5} bytes, no whitespace)")
    os.makedirs(bin_dir, exist_ok=True)
    target = os.path.join(bin_dir, PLUGIN_NAME)
    fd, tmp = tempfile.mkstemp(prefix=f".{PLUGIN_NAME}.", dir=bin_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(shebang)
            f.write(plugin_source())
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # a runtime running the old one keeps it; new runs get the new one
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m podnet.cni.install BIN_DIR", file=sys.stderr)
        return 2
    try:
        path = install_plugin(args[0])
    except (OSError, ValueError) as e:
        print(f"podnet-cni: cannot install into {args[0]}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
