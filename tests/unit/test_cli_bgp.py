"""The CLI with BGP objects: `get bgppeers/bgpconfig` tables, `bgp status` against a fake BIRD."""

import json

from tests.unit.test_bgp_status import SHOW_PROTOCOLS_ALL, FakeBird

from podnet.cli.main import main

MANIFESTS = """apiVersion: podnet.io/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false}
---
apiVersion: podnet.io/v1
kind: BGPPeer
metadata: {name: tor}
spec: {peerIP: 10.0.0.1, asNumber: 65001, nodeSelector: "rack=a"}
"""


def test_get_bgp_objects(tmp_path, capsys):
    (tmp_path / "bgp.yaml").write_text(MANIFESTS)
    store = f"sqlite://{tmp_path / 's.db'}"
    assert main(["--store", store, "apply", "-f", str(tmp_path / "bgp.yaml")]) == 0
    capsys.readouterr()
    assert main(["--store", store, "get", "bgppeers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PEER", "AS", "NODES"] and lines[1].split() == ["tor", "10.0.0.1", "65001",
                                                                                         "rack=a"]
    assert main(["--store", store, "get", "bgpconfig"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["default", "64512", "false"]


def test_a_bad_bgp_object_is_refused_naming_it_and_nothing_is_applied(tmp_path, capsys):
    """A BGPPeer with an AS out of range and one without asNumber, beside a good BGPConfiguration:
    one line per error naming file, object and field; exit 1; the store keeps only the peer it had."""
    bad = MANIFESTS.replace("asNumber: 65001", "asNumber: 4294967296") + (
        "---\napiVersion: podnet.io/v1\nkind: BGPPeer\nmetadata: {name: edge}\nspec: {peerIP: 10.0.0.9}\n")
    (tmp_path / "bgp.yaml").write_text(bad)
    (tmp_path / "before.yaml").write_text(MANIFESTS.split("---\n")[1].replace("name: tor", "name: before"))
    store = f"sqlite://{tmp_path / 's.db'}"
    assert main(["--store", store, "apply", "-f", str(tmp_path / "before.yaml")]) == 0
    capsys.readouterr()
    assert main(["--store", store, "apply", "-f", str(tmp_path / "bgp.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "bgp.yaml: document 1 (BGPPeer/tor): field spec.asNumber: asNumber 4294967296 is out of range" in err
    assert "bgp.yaml: document 2 (BGPPeer/edge): field spec.peerIP:" in err and "asNumber" in err
    assert main(["--store", store, "get", "bgppeers"]) == 0 and main(["--store", store, "get", "bgpconfig"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if not line.startswith("NAME")] == ["before"]


def test_bgp_status_against_bird(tmp_path, capsys):
    bird = FakeBird(tmp_path / "bird.ctl", {"show protocols all": SHOW_PROTOCOLS_ALL})
    try:
        code = main(["bgp", "status", "--control-socket", str(tmp_path / "bird.ctl")])
        out = capsys.readouterr().out
        assert code == 3  # a session is not Established
        assert out.splitlines()[0].split() == ["NODE", "PEER", "AS", "TYPE", "STATE", "SINCE", "IMPORTED", "EXPORTED"]
        assert "10.55.0.2" in out and "Established" in out and "Active" in out
        assert main(["bgp", "status", "--control-socket", str(tmp_path / "bird.ctl"), "-o", "json"]) == 3
        data = json.loads(capsys.readouterr().out)
        assert [s["neighbor"] for s in data["nodes"][0]["sessions"]] == ["10.55.0.2", "10.0.0.1"]
    finally:
        bird.close()
    assert main(["bgp", "status", "--control-socket", str(tmp_path / "none.ctl")]) == 1
    assert "does not answer" in capsys.readouterr().err
