"""Fixtures of the Kubernetes tests: a FakeApiServer (tests/support/fake_apiserver.py) per test
on a free loopback port, over HTTPS with a token, and a kubeconfig for it; a SQLite store,
podnet's CRDs on the fake, and kube-sync replicas started against both (stopped after the test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading

import pytest
import yaml

from podnet.kube.client import KubeClient, KubeConfig
from podnet.kube.crds import render
from podnet.kube.sync import KubeSync, KubeSyncConfig
from podnet.store import open_store
from podnet.store.objects import OBJECTS_PREFIX
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


FAST = dict(lease_duration=2.0, renew_deadline=1.5, retry=0.2)


@pytest.fixture
def store_url(tmp_path):
    url = f"sqlite://{tmp_path}/store.db"
    open_store(url, create=True).close()
    return url


@pytest.fixture
def crds(api):
    for doc in yaml.safe_load_all(render()):
        api.create(doc)


class Running:
    def __init__(self, sync: KubeSync):
        self.sync = sync
        self.thread = threading.Thread(target=sync.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.sync.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def start(api, kubeconfig, store_url):
    running: list[Running] = []

    def go(identity: str = "a", **cfg) -> KubeSync:
        client = KubeClient(KubeConfig.load(kubeconfig))
        sync = KubeSync(client, lambda: open_store(store_url, create=False),
                        KubeSyncConfig(identity=identity, **{**FAST, **cfg}))
        running.append(Running(sync))
        return sync

    yield go
    for r in running:
        r.stop()


def stored(store_url: str, kind: str) -> dict[str, dict]:
    with open_store(store_url, create=False) as kv:
        records, _ = kv.list(f"{OBJECTS_PREFIX}{kind}/")
    return {r.key[len(OBJECTS_PREFIX) + len(kind) + 1:]: r.value for r in records}
