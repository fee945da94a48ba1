"""Network namespaces for kernel tests: unique names, removed even when a test fails."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PYTHON = sys.executable


def sh(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


def py_in(ns: str, code: str, **kw) -> subprocess.CompletedProcess:
    """Run Python code inside a namespace (the code sees it as its own network)."""
    return in_ns(ns, PYTHON, "-c", code, **kw)


class Namespaces:
    def __init__(self) -> None:
        self.tag = f"pnt{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
        self.created: list[str] = []

    def new(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        self.created.append(name)
        sh("ip", "netns", "add", name)
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    def cleanup(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", name, check=False)


@contextmanager
def namespaces() -> Iterator[Namespaces]:
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.cleanup()
