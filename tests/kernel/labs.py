"""Labs for kernel tests: unique names, and nothing left behind, also when a test fails."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from podnet.lab import topology
from podnet.lab.cluster import down_by_name, up
from podnet.lab.connectivity import Lab
from podnet.lab.spec import parse_lab


@contextmanager
def running_lab(spec: dict, prefix: str, timeout: float = 90) -> Iterator[Lab]:
    """Bring up a lab from the `spec` of a Lab file; take it down afterwards and check
    that no namespace or /etc/netns entry of it is left."""
    root = Path(tempfile.mkdtemp(prefix=f"pn{prefix}-"))
    name = f"{prefix}-{secrets.token_hex(3)}"
    doc = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name}, "spec": spec}
    try:
        st = up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=root, timeout=timeout)
        try:
            yield Lab(st)
        finally:
            down_by_name(name, root)
            prefix_ns = f"pnl-{st.id}-"
            assert topology.netns_list(prefix_ns) == []
            assert not list(topology.ETC_NETNS.glob(f"{prefix_ns}*"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
