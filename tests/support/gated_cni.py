"""A CNI plugin for tests that holds an ADD until the test lets it go, then runs a reference
plugin: it makes "while the ADD runs" a moment a test can act in, without sleeping.

Its network configuration names the files and the plugin it runs:

    {"cniVersion": "1.0.0", "name": "gated", "type": "podnet-test-gate",
     "entered": "/tmp/x/entered", "gate": "/tmp/x/gate",
     "delegate": {"type": "bridge", "bridge": "br9", "ipam": {...}}}

ADD writes `entered`, waits (bounded) until `gate` exists, then runs /usr/lib/cni/<delegate
type> with the delegate's configuration (name, cniVersion and prevResult carried over); every
other command runs the delegate at once. install(dir) writes the executable as
dir/podnet-test-gate for the Python that runs the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_DIR = "/usr/lib/cni"
TYPE = "podnet-test-gate"
WAIT = 120.0


def install(directory: Path) -> Path:
    root = Path(__file__).resolve().parents[2]
    exe = directory / TYPE
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -m tests.support.gated_cni \"$@\"\n")
    exe.chmod(0o755)
    return exe


def main() -> int:
    raw = sys.stdin.read()
    conf = json.loads(raw)
    if os.environ.get("CNI_COMMAND") == "ADD":
        Path(conf["entered"]).write_text(str(os.getpid()))
        deadline = time.monotonic() + WAIT
        while not os.path.exists(conf["gate"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    delegate = {**conf["delegate"], "name": conf["name"], "cniVersion": conf["cniVersion"]}
    if "prevResult" in conf:
        delegate["prevResult"] = conf["prevResult"]
    proc = subprocess.run([os.path.join(REFERENCE_DIR, delegate["type"])], input=json.dumps(delegate), text=True,
                          capture_output=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
