"""Builds podnet's BPF programs: every native/bpf/*.c into build/bpf/*.o.

An object is compiled again only when its source, the shared headers of native/bpf
or the compiler command changed (a digest next to it, as the CNI plugin's build in
podnet.cni.install). `make setup` runs it; the agent reads the objects from there.

    python -m podnet.ebpf.build [--build-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from podnet.cni.install import _write_atomically
from podnet.errors import PodnetError

ROOT = Path(__file__).resolve().parents[3]
SOURCE_DIR = ROOT / "native" / "bpf"
BUILD_DIR = ROOT / "build" / "bpf"
CFLAGS = ("-O2", "-g", "-Wall", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu")


class BpfBuildError(PodnetError):
    pass


def object_path(name: str, build_dir: str | os.PathLike = BUILD_DIR) -> Path:
    """Where the object built from native/bpf/<name>.c is."""
    return Path(build_dir) / f"{name}.o"


def build_objects(build_dir: str | os.PathLike = BUILD_DIR, source_dir: str | os.PathLike = SOURCE_DIR,
                  clang: str | None = None) -> list[Path]:
    """Every object, compiled first where missing or stale."""
    clang = clang or os.environ.get("BPF_CLANG", "clang")
    build, sources = Path(build_dir), Path(source_dir)
    build.mkdir(parents=True, exist_ok=True)
    headers = b"".join(h.read_bytes() for h in sorted(sources.glob("*.h")))
    out = []
    for src in sorted(sources.glob("*.c")):
        command = [clang, *CFLAGS, f"-I{sources}"]
        key = hashlib.sha256(src.read_bytes() + headers + "\0".join(command).encode()).hexdigest()
        obj, stamp = build / f"{src.stem}.o", build / f"{src.stem}.o.sha256"
        out.append(obj)
        with contextlib.suppress(FileNotFoundError):
            if stamp.read_text().strip() == key and obj.is_file():
                continue

        def compile_to(tmp: str, src: Path = src, command: list[str] = command) -> None:
            try:
                proc = subprocess.run([*command, "-c", str(src), "-o", tmp], capture_output=True, text=True)
            except FileNotFoundError:
                raise BpfBuildError(f"{clang} not found: podnet's BPF programs are built with clang "
                                    "(Debian: clang, libbpf-dev)") from None
            if proc.returncode != 0:
                raise BpfBuildError(f"compiling {src} failed:\n{proc.stderr.strip()}")

        _write_atomically(build, obj.name, compile_to, 0o644)
        _write_atomically(build, stamp.name, lambda tmp, key=key: Path(tmp).write_text(key + "\n"), 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m podnet.ebpf.build", description=__doc__.splitlines()[0])
    p.add_argument("--build-dir", default=str(BUILD_DIR))
    args = p.parse_args(argv)
    try:
        for obj in build_objects(args.build_dir):
            print(obj)
    except BpfBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
