"""`make demo`: bring up the 3-node example lab, show what podnet programmed,
check that traffic flows as the manifests say, and take the lab down again."""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path

from podnet.errors import PodnetError

DEMO_LAB = Path(__file__).resolve().parents[2] / "examples" / "lab" / "demo.yaml"


def say(line: str) -> None:
    print(line, flush=True)


def section(title: str) -> None:
    say(f"\n== {title}")


def run_demo(lab_file: Path = DEMO_LAB) -> int:
    from podnet.cli.main import main as podnet_main
    from podnet.lab.cluster import down, down_by_name, up
    from podnet.lab.connectivity import Lab, format_table, probe_all
    from podnet.lab.spec import load_lab

    if os.geteuid() != 0:
        raise PodnetError("the demo needs root: it creates network namespaces")
    spec = load_lab(lab_file)
    down_by_name(spec.name)  # a demo left behind by an interrupted run
    section(f"bringing up lab {spec.name!r} from {lab_file}")
    started = time.monotonic()
    st = up(spec, say=lambda line: say(f"  {line}"))
    try:
        say(f"  up in {time.monotonic() - started:.1f} s")
        lab = Lab(st)
        section("pods")
        for p in lab.pods:
            say(f"  {p['namespace'] + '/' + p['name']:<20} node {p['node']:<8} ip {', '.join(p.get('ips') or ['-'])}")
        section("routes on node-1 (one per remote block; VXLAN via pn-vxlan, direct via the node address)")
        out = lab.exec_node("node-1", ["ip", "route", "show", "proto", "88"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            say(f"  {line}")
        section("IPAM")
        podnet_main(["--store", st.data["store"], "ipam", "show"])
        section("connectivity: real TCP/UDP connections between pods, to the outside host, from every node "
                "to pods on the others, and to NodePort 30080 on every node from the nodes and the outside host")
        say("  (expected: routing as configured, and the NetworkPolicy web-from-clients as upstream defines it;")
        say("   the node's own address as the source the pods see from nodes and through NodePorts)")
        rows = probe_all(lab)
        say(format_table(rows, wide=True))
        failed = [r for r in rows if not r.ok]
        failed += services_and_dns(lab)
        say("\nresult: " + ("every probe behaved as the manifests say" if not failed
                            else f"{len(failed)} probes did not behave as expected"))
        return 1 if failed else 0
    finally:
        section("taking the lab down")
        down(st, say=lambda line: say(f"  {line}"))


def services_and_dns(lab) -> list[str]:
    """The Service shop/web through its ClusterIP, policy behind it, and names via the node's DNS."""
    from collections import Counter

    from podnet.model.objects import Service

    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        say(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            problems.append(what)

    svc = lab.store().get(Service, "web", "shop")
    ip = svc.spec.cluster_ip if svc else None
    section(f"Service shop/web (ClusterIP {ip}, port 80 -> named port http on every app=web pod)")
    webs = {p["name"] for p in lab.pods if p["namespace"] == "shop" and p["name"].startswith("web-")}
    got = Counter(r.get("name") if r.get("ok") else "timeout"
                  for r in lab.probe("shop/client-1", [f"tcp:{ip}:80"] * 30, timeout=3))
    say(f"  30 connections from shop/client-1: {dict(sorted(got.items()))}")
    check(set(got) == webs, "every web pod, on all three nodes, serves the Service")
    blocked = lab.probe("default/batch-3", [f"tcp:{ip}:80"], timeout=3)[0]
    check(not blocked.get("ok"), "default/batch-3 (not a client) is dropped by the policy behind the Service")

    section("DNS from inside pods (glibc resolver, ndots:5, the node's server at 169.254.20.10)")
    lookups = [("default/client-2", "web.shop", ip), ("shop/client-1", "web", ip),
               ("shop/client-1", "web.shop.svc.cluster.local", ip)]
    if lab.state.process("external-dns") and lab.state.data.get("external"):
        # Outside the cluster: the node walks the search path itself (autopath), one query from the pod.
        outside = str(ipaddress.ip_interface(lab.state.data["external"]).ip)
        lookups.append(("default/batch-3", "www.example.test", outside))
    for pod, name, want in lookups:
        out = lab.exec(pod, ["getent", "hosts", name])
        answer = out.stdout.split()[0] if out.returncode == 0 and out.stdout else "no answer"
        check(answer == want, f"{pod}: getent hosts {name} -> {answer}")
    return problems


def main() -> int:
    try:
        return run_demo()
    except PodnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
