"""Incremental diffs against the real kernel: after random changes, the nftables table
built by diffs equals the table written whole, element for element (netlink read-back)
and rule for rule (`nft -j`); the eBPF backend's maps written as diffs equal maps
written from empty, entry for entry (generations aside)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.kernel.nsutil import namespaces, py_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

WORLD = r"""
rnd = random.Random(int(sys.argv[2]))
VALUES = ["a", "b", "c"]
def labels():
    return {k: rnd.choice(VALUES) for k in rnd.sample(["app", "tier"], rnd.randint(0, 2))}
def selector():
    return rnd.choice([{}, {"matchLabels": labels()},
                       {"matchExpressions": [{"key": "app", "operator": rnd.choice(["NotIn", "In"]), "values": ["a"]}]}])
def peer():
    return rnd.choice([{"podSelector": selector()}, {"namespaceSelector": selector()},
                       {"podSelector": selector(), "namespaceSelector": selector()},
                       {"ipBlock": {"cidr": "10.1.0.0/16", "except": [f"10.1.{rnd.randint(0, 9)}.0/24"]}}])
def port():
    return rnd.choice([{"port": 80}, {"port": 80, "endPort": 90}, {"port": "http"}, {"protocol": "UDP"},
                       {"port": "dns", "protocol": "UDP"}])
def rule(key):
    r = {}
    if rnd.random() < 0.7: r[key] = [peer() for _ in range(rnd.randint(1, 3))]
    if rnd.random() < 0.5: r["ports"] = [port() for _ in range(rnd.randint(1, 2))]
    return r
def policy(i):
    spec = {"podSelector": selector(), "ingress": [rule("from") for _ in range(rnd.randint(0, 2))]}
    if rnd.random() < 0.5:
        spec["egress"] = [rule("to") for _ in range(rnd.randint(0, 2))]
        spec["policyTypes"] = ["Ingress", "Egress"]
    return NetworkPolicy.model_validate({"metadata": {"name": f"p{i}", "namespace": rnd.choice(["x", "y"])}, "spec": spec})
def pod(i):
    return Pod.model_validate({"metadata": {"name": f"p{i}", "namespace": rnd.choice(["x", "y"]), "labels": labels()},
        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": rnd.choice([80, 8080])},
                                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        "status": {"podIP": f"10.1.{i // 200}.{i % 200 + 1}"}})

pods = {i: pod(i) for i in range(60)}
pols = {i: policy(i) for i in range(12)}
nss = {n: Namespace.model_validate({"metadata": {"name": n, "labels": labels()}}) for n in ("x", "y")}
local = set(rnd.sample(range(60), 20))
def change():
    global local
    what = rnd.choice(["relabel", "policy", "drop-policy", "ns", "pod-gone", "local"])
    if what == "relabel":
        for i in rnd.sample(sorted(pods), 3):
            pods[i] = pods[i].with_meta(labels=labels())
    elif what == "policy":
        i = rnd.randint(0, 15); pols[i] = policy(i)
    elif what == "drop-policy" and pols:
        pols.pop(rnd.choice(sorted(pols)))
    elif what == "ns":
        n = rnd.choice(["x", "y"]); nss[n] = nss[n].with_meta(labels=labels())
    elif what == "pod-gone":
        i = rnd.choice(sorted(pods)); pods.pop(i); local.discard(i)
        j = max(pods) + 1; pods[j] = pod(j); local.add(j)
    else:
        local = set(rnd.sample(sorted(pods), 20))
    return what, (list(pods.values()), list(nss.values()), list(pols.values()),
                  [f"10.1.{i // 200}.{i % 200 + 1}" for i in local])
"""

SCRIPT = r"""
import json, random, subprocess, sys
from podnet.dataplane.nft import NftError
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.netns import in_netns
from podnet.dataplane.nftables import read_ruleset
from podnet.dataplane.ruledigest import read_digests
from podnet.policy.applier import PolicyProgrammer

OTHER = sys.argv[1]

def run_other(script):
    p = subprocess.run(["ip", "netns", "exec", OTHER, "nft", "-f", "-"], input=script, capture_output=True, text=True)
    if p.returncode:
        raise NftError(p.stderr)

def list_in(ns):
    cmd = ["nft", "-j", "list", "table", "ip", "podnet-policy"]
    return subprocess.run((["ip", "netns", "exec", ns] if ns else []) + cmd, capture_output=True, text=True,
                          check=True).stdout

def rules(listing):
    out = {}
    for item in json.loads(listing)["nftables"]:
        if "rule" in item:
            out.setdefault(item["rule"]["chain"], []).append(json.dumps(item["rule"]["expr"], sort_keys=True))
    return out

""" + WORLD + r"""
here, there = nl.Netlink(), in_netns(f"/run/netns/{OTHER}", nl.Netlink)
inc, whole = PolicyProgrammer(), PolicyProgrammer(run=run_other, reader=lambda: read_ruleset(there, "podnet-policy"),
                                                   digests=lambda chains=None: read_digests(there, "podnet-policy", chains))
report = []
for step in range(25):
    what, args = change()
    ch = inc.sync(*args)
    whole.applier.applied = None
    whole.sync(*args)
    a, b = list_in(None), list_in(OTHER)
    view_a, view_b = read_ruleset(here, "podnet-policy"), read_ruleset(there, "podnet-policy")
    report.append({"step": step, "what": what, "full": ch.full, "commands": ch.commands, "netlink": ch.netlink,
                   "verify": inc.verify(), "same_view": view_a.dump(rules=False) == view_b.dump(rules=False), "same_rules": rules(a) == rules(b)})
print(json.dumps(report))
"""


@pytest.mark.parametrize("seed", [1, 2])
def test_random_changes_applied_as_diffs_equal_a_full_rewrite(seed):
    with namespaces() as ns:
        a, b = ns.new("inc"), ns.new("whole")
        report = json.loads(py_in(a, SCRIPT.replace("sys.argv[1]", repr(b)).replace("sys.argv[2]", str(seed)),
                                  timeout=120).stdout)
        assert report[0]["full"]
        assert any(not r["full"] and r["commands"] for r in report[1:]), "no step was applied as a diff"
        # element-only steps went as netlink batches, the others as nft text: both checked below
        assert any(r["netlink"] for r in report) and any(r["commands"] and not r["netlink"] for r in report[1:])
        for r in report:
            assert not r["full"] or r["step"] == 0, r
            assert r["verify"] == [] and r["same_view"] and r["same_rules"], r


EBPF_SCRIPT = r"""
import json, random, sys
from podnet.ebpf.bpffs import PinDir
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.policy.ebpf import maps as m
from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer

def logical(pp):
    # the maps by meaning: a group's rules read at its generation; every rule entry must
    # belong to a group's current generation
    d = {name: pp.maps.dump(name) for name in
         ("podnet_pol_pods", "podnet_pol_groups", "podnet_pol_rules", "podnet_pol_peers", "podnet_pol_ports")}
    rules = d.pop("podnet_pol_rules")
    groups, used = {}, set()
    for k, v in d.pop("podnet_pol_groups").items():
        (gid,), (count, gen) = m.GROUP_KEY.unpack(k), m.GROUP_VALUE.unpack(v)
        keys = [m.rule_key(gid, gen, i) for i in range(count)]
        used.update(keys)
        groups[str(gid)] = [rules.get(key, b"missing").hex() for key in keys]
    return {"groups": groups, "stray_rules": len(set(rules) - used),
            **{n: sorted(k.hex() + v.hex() for k, v in t.items()) for n, t in d.items()}}

BPFFS = sys.argv[1]
""" + WORLD + r"""
inc = EbpfPolicyProgrammer(PinDir.for_instance("inc", bpffs=BPFFS), interfaces=dict)
report = []
for step in range(25):
    what, args = change()
    ch = inc.sync(*args)
    whole = EbpfPolicyProgrammer(PinDir.for_instance(f"whole{step}", bpffs=BPFFS), interfaces=dict)
    whole.sync(*args)
    a, b = logical(inc), logical(whole)
    whole.maps.close()
    whole.maps.pins.remove()
    report.append({"step": step, "what": what, "loaded": ch.loaded, "full": ch.full,
                   "changed": ch.written + ch.deleted,
                   "verify": inc.verify(), "same": a == b, "stray": a["stray_rules"],
                   "entries": sum(len(v) for k, v in a.items() if k != "stray_rules")})
print(json.dumps(report))
"""


@pytest.mark.parametrize("seed", [1, 2])
def test_random_changes_to_ebpf_maps_equal_maps_written_from_empty(seed, tmp_path):
    with namespaces() as ns:
        a = ns.new("inc")
        subprocess.run(["mount", "-t", "bpf", "bpf", str(tmp_path)], check=True)  # the test's own pins
        try:
            script = EBPF_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path))).replace("sys.argv[2]", str(seed))
            report = json.loads(py_in(a, script, timeout=300).stdout)
        finally:
            subprocess.run(["umount", str(tmp_path)], check=True)
    assert report[0]["loaded"] and all(r["entries"] for r in report)
    assert sum(1 for r in report[1:] if r["changed"]) >= 10, "too few steps changed the maps"
    for r in report:
        assert not r["loaded"] or r["step"] == 0, r
        assert not r["full"] or r["step"] == 0, r  # after the first: only what the change touched
        assert r["verify"] == [] and r["same"] and r["stray"] == 0, r
