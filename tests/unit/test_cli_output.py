"""The operator interface every command shares: one `-o table|wide|yaml|json`, one table
printer, global flags before or after the command, `--version`, and the exit codes
0 ok, 1 error, 2 usage, 3 "ran fine and found something"."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from podnet.cli.main import build_parser, main
from podnet.cli.output import Column, table
from podnet.cli.version import package_version
from podnet.lab.state import LabState

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.99.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, nodePort: 30080}]}
---
apiVersion: podnet.io/v1
kind: IPPool
metadata: {name: main}
spec: {cidr: 10.244.0.0/24, blockSize: 28}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}, matchExpressions: [{key: tier, operator: In, values: [b, a]}]}
  policyTypes: [Ingress]
"""


def parse_table(lines: list[str]) -> list[dict[str, str]]:
    """Rows of a printed table by header, cut where each header starts (cells may hold spaces)."""
    starts = [i for i, ch in enumerate(lines[0]) if ch != " " and (i == 0 or lines[0][i - 1] == " ")]
    names = lines[0].split()
    ends = [*starts[1:], None]
    return [{n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)} for line in lines[1:]]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(tmp_path, monkeypatch, capsys):
    """A store holding MANIFESTS, named only on the command line ($PODNET_STORE points nowhere)."""
    url = f"sqlite://{tmp_path}/podnet.db"
    monkeypatch.setenv("PODNET_STORE", f"sqlite://{tmp_path}/nowhere/podnet.db")
    f = tmp_path / "m.yaml"
    f.write_text(MANIFESTS)
    assert main(["--store", url, "apply", "-f", str(f)]) == 0
    assert main(["--store", url, "ipam", "allocate", "--node", "n1", "--handle", "web-1", "--namespace", "shop",
                 "--pod", "web-1", "--ip", "10.244.0.5"]) == 0
    capsys.readouterr()
    return url


# ---------------------------------------------------------------- the table printer


def test_table_is_kubectl_style():
    cols = [Column("name", lambda r: r["n"]), Column("ip", lambda r: r.get("ip")),
            Column("ports", lambda r: r.get("ports")), Column("ok", lambda r: r.get("ok")),
            Column("node", lambda r: r.get("node"), wide=True), Column("note", lambda r: r.get("note"), empty="")]
    rows = [{"n": "a-long-name", "ip": "10.0.0.1", "ports": [80, 443], "ok": True, "node": "n1"},
            {"n": "b", "ip": "", "ports": [], "ok": False, "note": "x"},
            {"n": "c"}]
    assert table(cols, rows).splitlines() == [
        "NAME          IP         PORTS    OK       NOTE",
        "a-long-name   10.0.0.1   80,443   true",
        "b             <none>     <none>   false    x",
        "c             <none>     <none>   <none>",
    ]
    wide = table(cols, rows, wide=True).splitlines()
    assert wide[0] == "NAME          IP         PORTS    OK       NODE     NOTE"
    assert wide[1] == "a-long-name   10.0.0.1   80,443   true     n1"
    assert table(cols, [], indent="  ") == "  NAME   IP   PORTS   OK   NOTE"


# ---------------------------------------------------------------- -o on every command


def test_get_table_and_wide(store, capsys):
    code, out, _ = run(capsys, "get", "pods", "-A", "--store", store)
    assert code == 0 and out.splitlines() == ["NAMESPACE   NAME    STATUS", "shop        web-1   Running"]
    code, out, _ = run(capsys, "get", "pods", "-A", "-o", "wide", "--store", store)
    assert out.splitlines()[0].split() == ["NAMESPACE", "NAME", "STATUS", "IP", "NODE", "HOST-NETWORK", "NETWORKS"]
    assert out.splitlines()[1].split() == ["shop", "web-1", "Running", "10.244.0.5", "n1", "false", "<none>"]

    code, out, _ = run(capsys, "get", "svc", "-n", "shop", "--store", store)
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    assert lines[1][0:2] == ["web", "NodePort"] and lines[1][3:] == ["<none>", "80:30080/TCP"]
    code, out, _ = run(capsys, "get", "svc", "-n", "shop", "-o", "wide", "--store", store)
    assert out.splitlines()[0].split()[-1] == "SELECTOR" and out.splitlines()[1].split()[-1] == "app=web"

    code, out, _ = run(capsys, "get", "netpol", "-n", "shop", "-o", "wide", "--store", store)
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["NAME", "POD-SELECTOR", "POLICY-TYPES", "INGRESS-RULES", "EGRESS-RULES"]
    assert out.splitlines()[1].split("   ")[1].strip() == "app=web,tier in (a,b)"

    code, out, _ = run(capsys, "get", "nodes", "-o", "wide", "--store", store)
    assert [line.split() for line in out.splitlines()] == [
        ["NAME", "INTERNAL-IP", "EXTERNAL-IP", "POD-CIDR", "UNSCHEDULABLE"],
        ["n1", "10.99.0.1", "<none>", "<none>", "false"]]
    code, out, _ = run(capsys, "get", "ippools", "--store", store)
    assert out.splitlines()[0].split() == ["NAME", "CIDR", "BLOCK", "ENCAP", "NAT", "DISABLED"]


@pytest.mark.parametrize("fmt, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_get_json_and_yaml(store, capsys, fmt, load):
    code, out, _ = run(capsys, "get", "svc", "-A", "-o", fmt, "--store", store)
    data = load(out)
    assert code == 0 and data["kind"] == "List" and data["items"][0]["metadata"]["name"] == "web"
    code, out, _ = run(capsys, "get", "pod", "web-1", "-n", "shop", "-o", fmt, "--store", store)
    assert load(out)["status"]["podIP"] == "10.244.0.5"


def test_ipam_show_wide_json_yaml(store, capsys):
    code, out, _ = run(capsys, "ipam", "show", "--store", store)
    lines = [line.split() for line in out.splitlines() if line]
    assert lines[0] == ["POOL", "CIDR", "BLOCK", "BLOCKS", "USED", "TOTAL", "UTIL"]
    assert lines[2] == ["NODE", "BLOCK", "POOL", "USED"]
    code, out, _ = run(capsys, "ipam", "show", "-o", "wide", "--store", store)
    lines = [line.split() for line in out.splitlines() if line]
    assert lines[0] == ["POOL", "CIDR", "BLOCK", "BLOCKS", "USED", "TOTAL", "UTIL", "FREE", "DISABLED"]
    assert lines[1] == ["main", "10.244.0.0/24", "/28", "1/16", "1", "256", "0.4%", "255", "false"]
    assert lines[2] == ["NODE", "BLOCK", "POOL", "USED", "FREE", "UTIL"]
    assert lines[3] == ["n1", "10.244.0.0/28", "main", "1/16", "15", "6.2%"]
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        code, out, _ = run(capsys, "ipam", "show", "-o", fmt, "--store", store)
        data = load(out)
        assert code == 0 and data["pools"][0]["used"] == 1 and data["blocks"][0]["node"] == "n1"


def test_ipam_check_and_release_formats(store, capsys):
    # An address held for a pod that does not exist: a leak.
    run(capsys, "ipam", "allocate", "--node", "n1", "--handle", "h", "--namespace", "shop", "--pod", "gone",
        "--ip", "10.244.0.9", "--store", store)
    code, out, _ = run(capsys, "ipam", "check", "-o", "wide", "--store", store)
    lines = out.splitlines()
    assert code == 3
    assert lines[0].split() == ["KIND", "NODE", "BLOCK", "ADDRESS", "HANDLE", "POD", "MESSAGE"]
    assert lines[1].split()[:6] == ["leaked-allocation", "<none>", "10.244.0.0/28", "10.244.0.9", "h", "<none>"]
    assert "pod shop/gone no longer exists" in lines[1]
    code, out, _ = run(capsys, "ipam", "check", "-o", "yaml", "--store", store)
    assert code == 3 and yaml.safe_load(out)[0]["handle"] == "h"

    code, out, _ = run(capsys, "ipam", "release", "--leaked", "--grace", "1h", "-o", "json", "--store", store)
    data = json.loads(out)
    assert code == 0 and data["released"] == [] and data["waiting"][0]["address"] == "10.244.0.9"
    code, out, _ = run(capsys, "ipam", "release", "--leaked", "--grace", "0", "-o", "wide", "--store", store)
    lines = out.splitlines()
    assert lines[0].split() == ["RESULT", "ADDRESS", "HANDLE", "BLOCK", "KIND", "REASON"]
    assert lines[1].split()[:4] == ["released", "10.244.0.9", "h", "10.244.0.0/28"]
    code, out, _ = run(capsys, "ipam", "release", "--leaked", "-o", "yaml", "--store", store)
    assert yaml.safe_load(out) == {"released": [], "waiting": [], "forgotten": 0}
    assert run(capsys, "ipam", "check", "--store", store)[0] == 0


PLAN = ["plan", "--nodes", "5000", "--max-pods-per-node", "110", "--services", "10000"]


def test_plan_formats(capsys):
    code, out, _ = run(capsys, *PLAN)
    assert code == 0 and "BGP sessions" not in out and "WITHIN-MAX-ROUTES" not in out
    code, out, _ = run(capsys, *PLAN, "-o", "wide")
    assert code == 0 and "BGP sessions (if routing were bgp; it is vxlan)" in out and "WITHIN-MAX-ROUTES" in out
    code, out, _ = run(capsys, *PLAN, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["block"]["prefix_length"] == 26
    code, out, err = run(capsys, *PLAN, "--json")  # the old spelling
    assert code == 0 and json.loads(out)["block"]["prefix_length"] == 26
    assert err == "warning: --json is deprecated: use -o json\n"


def test_lab_status_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PODNET_LAB_ROOT", str(tmp_path / "labs"))
    st = LabState.create("a", tmp_path / "labs")
    st.set(nodes=[{"name": "n1", "address": "10.99.0.1", "netns": "pn-a-n1", "podCIDR": "10.244.0.0/26"}],
           pods=[{"namespace": "shop", "name": "web-1", "node": "n1", "ips": ["10.244.0.5"], "netns": "pn-a-web"}])
    st.unlock()
    code, out, _ = run(capsys, "lab", "status")
    lines = [line.split() for line in out.splitlines()]
    nodes = next(i for i, line in enumerate(lines) if line[:1] == ["NODE"])
    assert code == 0 and "POD-CIDR" not in lines[nodes]
    code, out, _ = run(capsys, "lab", "status", "-o", "wide")
    lines = [line.split() for line in out.splitlines()]
    nodes = next(i for i, line in enumerate(lines) if line[:1] == ["NODE"])
    node = parse_table(out.splitlines()[nodes:nodes + 2])[0]
    assert (node["NODE"], node["POD-CIDR"], node["LOG"]) == ("n1", "10.244.0.0/26", "<none>")
    assert lines[lines.index(["POD", "NODE", "IP", "NETNS", "SERVER", "READY"]) + 1] == [
        "shop/web-1", "n1", "10.244.0.5", "pn-a-web", "none", "false"]
    code, out, _ = run(capsys, "lab", "status", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["pods"][0]["ips"] == ["10.244.0.5"]


# ---------------------------------------------------------------- global flags, anywhere


def _leaves(parser: argparse.ArgumentParser, path=()):
    """Every command and subcommand: (argv prefix, its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _leaves(sub, (*path, name))


def test_every_command_takes_the_global_flags_after_its_name():
    parser = build_parser()
    commands = list(_leaves(parser))
    assert len(commands) > 15
    for path, sub in commands:
        for flag in ("--store", "--cacert", "--cert", "--user", "--password"):
            assert flag in sub._option_string_actions, (path, flag)
        action = sub._option_string_actions["--cacert"]
        assert action.default is argparse.SUPPRESS, path  # never overwrites a value given before the command
    assert parser._option_string_actions["--store"].default is None


def test_store_before_or_after_the_command(store, capsys, monkeypatch):
    assert run(capsys, "--store", store, "get", "svc", "-A")[1] == run(capsys, "get", "svc", "-A", "--store", store)[1]
    assert run(capsys, "ipam", "--store", store, "show")[0] == 0  # between group and subcommand
    # The later value wins; one given before the command is not reset by the subcommand.
    code, _, err = run(capsys, "--store", store, "get", "svc", "--store", "sqlite:///nonexistent/x.db")
    assert code == 1 and "/nonexistent/x.db does not exist" in err
    assert run(capsys, "--store", "sqlite:///nonexistent/x.db", "get", "svc", "-A", "--store", store)[0] == 0
    assert run(capsys, "--store", store, "get", "svc", "-A")[0] == 0  # not $PODNET_STORE


def test_etcd_flags_after_the_command_and_delete_keeps_its_key():
    parse = build_parser().parse_args
    args = parse(["get", "nodes", "--cacert", "/ca.pem", "--user", "u:p"])
    assert (args.etcd_cacert, args.etcd_user) == ("/ca.pem", "u:p")
    args = parse(["--cacert", "/before.pem", "ipam", "show", "--cacert", "/after.pem"])
    assert args.etcd_cacert == "/after.pem"
    args = parse(["--cert", "/c.pem", "ipam", "check"])
    assert args.etcd_cert == "/c.pem"  # not reset by the subcommand
    args = parse(["delete", "--key", "/podnet/objects/x"])
    assert args.key == "/podnet/objects/x" and args.etcd_key is None


# ---------------------------------------------------------------- --version


def test_version(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--version"])
    out = capsys.readouterr().out
    assert ex.value.code == 0 and out.startswith(f"podnet {package_version()} (Python ")
    code, out, _ = run(capsys, "version")
    assert code == 0 and out.startswith(f"podnet {package_version()}")
    code, out, _ = run(capsys, "version", "-o", "json")
    assert json.loads(out)["podnet"] == package_version()
    code, out, _ = run(capsys, "version", "-o", "yaml")
    assert yaml.safe_load(out)["podnet"] == package_version()


# ---------------------------------------------------------------- exit codes


def test_exit_codes(store, capsys):
    assert run(capsys, "get", "svc", "-A", "--store", store)[0] == 0
    code, out, err = run(capsys, "get", "svc", "nope", "--store", store)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    with pytest.raises(SystemExit) as ex:
        main(["get", "svc", "-o", "xml"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'xml'" in err
    assert run(capsys, *PLAN, "--routing", "bgp", "--strict")[0] == 3
    assert run(capsys, *PLAN, "--routing", "bgp")[0] == 0
    assert run(capsys, "ipam", "check", "--store", store)[0] == 0


def test_the_ebpf_policy_without_the_ebpf_services_is_refused_naming_both_options(capsys):
    code, out, err = run(capsys, "agent", "--node", "n1", "--policy-dataplane", "ebpf", "--store", "sqlite:///nowhere")
    assert code == 1 and err.count("\n") == 1, err
    assert "--policy-dataplane ebpf needs --service-proxy ebpf, not nftables" in err


def test_an_unexpected_failure_is_still_one_line(store, capsys, monkeypatch):
    import podnet.cli.ipam as ipam

    def broken(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(ipam, "cmd_show", broken)
    code, out, err = run(capsys, "ipam", "show", "--store", store)
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: unexpected RuntimeError: something nobody expected")
