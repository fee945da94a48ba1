"""`podnet policy explain`: agrees with every truth table, names the rule, and works from the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.support.policy_cases import PODS, CaseWorld, load_cases

from podnet.cli.main import main
from podnet.model.objects import Node
from podnet.policy.explain import ExplainError, explain

CASES = load_cases(Path(__file__).parent.parent / "policy_cases")
NODE = Node.model_validate({"metadata": {"name": "n1"},
                            "status": {"addresses": [{"type": "InternalIP", "address": "10.99.0.1"}]}})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_explain_agrees_with_the_truth_tables(case):
    world = CaseWorld(case)
    for step in case.steps:
        world.step(step)
        pods, nss, pols = world.pods(), world.namespaces(), world.policy_list()
        for probe in step.probes[:1]:
            for s in PODS:
                for d in PODS:
                    ex = explain(pods, nss, pols, [], s, d, f"{probe.port}/{probe.protocol}")
                    assert ex.allowed == probe.expect.allowed[s][d], (case.name, s, d, ex.text())


def _world(name):
    world = CaseWorld(next(c for c in CASES if c.name == name))
    for step in world.case.steps[:1]:
        world.step(step)
    return world.pods(), world.namespaces(), world.policy_list()


def test_explain_names_the_rule_and_the_reason():
    pods, nss, pols = _world("pod-or-namespace-or")
    ex = explain(pods, nss, pols, [], "x/b", "x/a", "80")
    assert ex.allowed and "allowed by x/or ingress rule 0" in ex.text()
    ex = explain(pods, nss, pols, [], "x/c", "x/a", "80/TCP")
    text = ex.text()
    assert not ex.allowed and "DENIED" in text and "selected by x/or" in text
    assert "source 10.244.0.13 is not pods pod=b in namespace x" in text
    assert "ingress denied" in text


def test_explain_egress_and_own_node():
    pods, nss, pols = _world("deny-all-egress")
    ex = explain(pods, nss, pols, [], "x/a", "y/a", "80/UDP")
    assert not ex.allowed and "egress of x/a" in ex.text() and "isolate and allow nothing" in ex.text()
    # the pod's own node is always allowed, both ways
    assert explain(pods, nss, pols, [NODE], "x/a", "10.99.0.1", "80").allowed
    assert explain(pods, nss, pols, [NODE], "10.99.0.1", "x/a", "80").allowed


def test_a_pod_always_reaches_itself_even_under_deny_all():
    from podnet.policy.compiler import compile_policy
    from podnet.policy.evaluate import reference_allowed, walk
    from podnet.policy.model import InputCache

    pods, nss, pols = _world("deny-all")
    ex = explain(pods, nss, pols, [], "x/a", "x/a", "80/TCP")
    assert ex.allowed, ex.text()
    assert ex.text() == ("x/a (10.244.0.11) -> x/a (10.244.0.11) 80/TCP: ALLOWED\n"
                         "x/a (10.244.0.11) is both ends: a pod talking to itself: the packets stay on its "
                         "loopback and never reach the policy table; always allowed")
    assert not explain(pods, nss, pols, [], "x/a", "x/b", "80/TCP").allowed  # the policy still isolates
    inputs = InputCache().inputs(pods, nss, pols, [p.status.pod_ip for p in pods])
    assert walk(compile_policy(inputs), "10.244.0.11", "10.244.0.11", "TCP", 80).allowed
    assert reference_allowed(inputs, "10.244.0.11", "10.244.0.11", "TCP", 80)


def test_explain_rejects_bad_arguments():
    pods, nss, pols = _world("deny-all-egress")
    with pytest.raises(ExplainError, match="no pod"):
        explain(pods, nss, pols, [], "x/nope", "x/a", "80")
    with pytest.raises(ExplainError, match="protocol"):
        explain(pods, nss, pols, [], "x/a", "x/b", "80/ICMP")
    with pytest.raises(ExplainError, match="port"):
        explain(pods, nss, pols, [], "x/a", "x/b", "http")


def test_cli_reads_the_store(tmp_path, capsys):
    pods, nss, pols = _world("ipblock-except")
    store = f"sqlite:///{tmp_path}/s.db"
    for obj in [*nss, *pods, *pols]:
        f = tmp_path / f"{obj.kind}-{obj.namespace}-{obj.name}.json"
        f.write_text(json.dumps(obj.to_dict()))
        assert main(["--store", store, "apply", "-f", str(f)]) == 0
    capsys.readouterr()
    assert main(["--store", store, "policy", "explain", "y/a", "x/a", "80/TCP"]) == 3
    assert "x/cidr-in" in capsys.readouterr().out
    assert main(["--store", store, "policy", "explain", "z/b", "x/a", "80", "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allowed"] and out["ingress"]["allowed_by"] == {"policy": "x/cidr-in", "rule": 0}
    # Every output format; denied is exit 3 in each ("ran fine and found something"), and the
    # store may be named after the command too.
    argv = ["policy", "explain", "y/a", "x/a", "80/TCP", "--store", store]
    assert main([*argv, "-o", "yaml"]) == 3
    assert yaml.safe_load(capsys.readouterr().out)["allowed"] is False
    assert main([*argv, "-o", "json"]) == 3
    assert json.loads(capsys.readouterr().out)["ingress"]["allowed_by"] is None
    assert main([*argv, "-o", "wide"]) == 3
    out = capsys.readouterr().out
    assert "DENIED" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("DIRECTION"))
    assert lines[header].split() == ["DIRECTION", "ISOLATED", "VERDICT", "ALLOWED-BY", "POLICIES"]
    assert lines[header + 2].split()[:3] == ["ingress", "true", "denied"]
    assert main([*argv, "-o", "text"]) == 3  # the old name of -o table
    out, err = capsys.readouterr()
    assert "DENIED" in out and "DIRECTION" not in out and "-o text is deprecated" in err
