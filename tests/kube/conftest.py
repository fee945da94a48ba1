"""Fixtures of the Kubernetes tests: a FakeApiServer (tests/support/fake_apiserver.py) per test
on a free loopback port, over HTTPS with a token, and a kubeconfig for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.support.fake_apiserver import FakeApiServer


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.2) as fake:
        yield fake


@pytest.fixture
def kubeconfig(api, tmp_path):
    return api.kubeconfig(str(tmp_path / "kubeconfig"))


def kubectl_binary() -> tuple[str, list[str]] | None:
    """kubectl on PATH and the flags it needs against the fake: before 1.27 kubectl validates
    with the OpenAPI v2 schema (protobuf), which the fake does not serve, so validation is off;
    from 1.27 on it asks the server to validate (fieldValidation), which the fake does."""
    path = shutil.which(os.environ.get("PODNET_KUBECTL", "kubectl"))
    if path is None:
        return None
    home = tempfile.mkdtemp(prefix="podnet-kubectl-home-")
    try:
        out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "HOME": home})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    try:
        minor = int("".join(c for c in json.loads(out.stdout)["clientVersion"]["minor"] if c.isdigit()))
    except (ValueError, KeyError):
        return None
    return path, (["--validate=false"] if minor < 27 else [])


@pytest.fixture
def kubectl(kubeconfig, tmp_path):
    found = kubectl_binary()
    if found is None:
        pytest.skip("no kubectl on PATH (Debian: kubernetes-client)")
    path, flags = found
    env = {**os.environ, "KUBECONFIG": kubeconfig, "HOME": str(tmp_path)}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = [path, *args]
        if args and args[0] in ("apply", "create", "replace"):
            argv += flags
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc

    run.path = path  # type: ignore[attr-defined]
    run.env = env  # type: ignore[attr-defined]
    return run
