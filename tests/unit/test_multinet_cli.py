"""`podnet apply/get` with NetworkAttachmentDefinitions and pods' attachments (no root)."""

from __future__ import annotations

import json

import pytest

from podnet.cli.main import main
from podnet.multinet import ANNOTATION_STATUS

NAD = ("apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata: {name: underlay}\n"
       "spec:\n  config: '{\"cniVersion\": \"1.0.0\", \"type\": \"macvlan\", \"master\": \"data0\", "
       "\"ipam\": {\"type\": \"podnet-ipam\", \"pools\": [\"global\"]}}'\n")
STATUS = [{"name": "podnet", "interface": "eth0", "ips": ["10.244.0.5"], "default": True, "dns": {}},
          {"name": "default/underlay", "interface": "net1", "ips": ["10.99.0.70"], "mac": "02:00:00:00:00:01",
           "dns": {}}]
POD = ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n"
       "    k8s.v1.cni.cncf.io/networks: underlay\n"
       f"    {ANNOTATION_STATUS}: '{json.dumps(STATUS)}'\n"
       "spec: {nodeName: node-1, containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.244.0.5}\n")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PODNET_STORE", f"sqlite://{tmp_path}/podnet.db")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_get_shows_the_nad_plugins_and_every_attachment_of_a_pod(store, tmp_path, capsys):
    f = tmp_path / "m.yaml"
    f.write_text(NAD + "---\n" + POD)
    code, out, err = run(capsys, "apply", "-f", str(f))
    assert code == 0, err
    code, out, _ = run(capsys, "get", "net-attach-def")
    assert "underlay" in out and "macvlan (ipam podnet-ipam)" in out
    code, out, _ = run(capsys, "get", "pod", "web", "-o", "wide")
    assert "NETWORKS" in out and "eth0=10.244.0.5,net1=10.99.0.70(default/underlay)" in out


def test_a_bad_nad_is_refused_naming_the_file_object_and_field(store, tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(NAD.replace('\\"type\\": \\"macvlan\\"', '\\"type\\": \\"../x\\"').replace('"macvlan"', '"../x"'))
    code, _, err = run(capsys, "apply", "-f", str(f))
    assert code == 1
    assert "bad.yaml: document 0 (NetworkAttachmentDefinition/underlay): field spec.config: type: '../x'" \
        in err, err
