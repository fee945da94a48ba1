"""Builds the CNI plugin executable `podnet-cni` and installs it into a CNI bin directory,
also as `podnet-ipam`: the same executable is the IPAM plugin under that name.

The plugin is a small C program, native/cni/podnet-cni.c, linked statically: the file
installed needs nothing on the host, neither this checkout nor Python, and starts in
about a millisecond. build_plugin() compiles it into build/ when the source or the
compiler command changed; install_plugin() copies the binary into a bin directory when
the copy there differs, through a temporary file renamed over the old one (a runtime
running the old one keeps it; new runs get the new one).

    python -m podnet.cni.install [--build-dir DIR] BIN_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PLUGIN_NAME = "podnet-cni"
IPAM_NAME = "podnet-ipam"  # the same binary; it looks at the name it was run under
ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "native" / "cni" / "podnet-cni.c"
BUILD_DIR = ROOT / "build"
CFLAGS = ("-static", "-O2", "-s", "-Wall", "-Wextra")


class PluginBuildError(Exception):
    pass


def _write_atomically(directory: Path, name: str, write, mode: int = 0o755) -> Path:
    """Calls write(temp_path), gives the result its mode and renames it to directory/name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return directory / name


def build_plugin(build_dir: str | os.PathLike = BUILD_DIR, cc: str | None = None) -> str:
    """Path of the compiled plugin in build_dir, compiling it first if it is missing or stale."""
    cc = cc or os.environ.get("CC", "gcc")
    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    command = [cc, *CFLAGS]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(command).encode()).hexdigest()
    binary, stamp = build / PLUGIN_NAME, build / f"{PLUGIN_NAME}.sha256"
    with contextlib.suppress(FileNotFoundError):
        if stamp.read_text().strip() == key and binary.is_file():
            return str(binary)

    def compile_to(tmp: str) -> None:
        try:
            proc = subprocess.run([*command, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        except FileNotFoundError:
            raise PluginBuildError(f"{cc} not found: the CNI plugin is built with a C compiler "
                                   "(Debian: gcc and libc6-dev)") from None
        if proc.returncode != 0:
            raise PluginBuildError(f"compiling {SOURCE} failed:\n{proc.stderr.strip()}")

    _write_atomically(build, PLUGIN_NAME, compile_to)
    _write_atomically(build, f"{PLUGIN_NAME}.sha256", lambda tmp: Path(tmp).write_text(key + "\n"), 0o644)
    return str(binary)


def install_plugin(bin_dir: str | os.PathLike, binary: str | None = None) -> str:
    """Copy the plugin (built if need be) to bin_dir/podnet-cni and bin_dir/podnet-ipam unless
    the same file is there; the path of podnet-cni."""
    source = Path(binary or build_plugin())
    Path(bin_dir).mkdir(parents=True, exist_ok=True)
    content = source.read_bytes()
    for name in (IPAM_NAME, PLUGIN_NAME):  # podnet-cni last: its path is what callers wait for
        target = Path(bin_dir) / name
        with contextlib.suppress(OSError):
            if not target.is_symlink() and os.access(target, os.X_OK) and target.read_bytes() == content:
                continue
        _write_atomically(Path(bin_dir), name, lambda tmp: shutil.copyfile(source, tmp))
    return str(Path(bin_dir) / PLUGIN_NAME)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m podnet.cni.install", description=__doc__.splitlines()[0])
    ap.add_argument("bin_dir", help="the CNI bin directory (for a node: /opt/cni/bin)")
    ap.add_argument("--build-dir", default=str(BUILD_DIR), help="where the plugin is compiled (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        path = install_plugin(args.bin_dir, build_plugin(args.build_dir))
    except (OSError, PluginBuildError) as e:
        print(f"podnet-cni: cannot install into {args.bin_dir}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
