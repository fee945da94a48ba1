"""BGP with BIRD: convergence, route scale through a reflector, sessions per node. Not a
test: prints tables and writes bench/results/bgp.json.

1. Convergence (real labs: an agent and a BIRD per node, flat underlay, pools without
   encapsulation). A block is claimed for one node through IPAM in the lab's store; the
   time until the route is in the kernel of every other node (`ip monitor route` in each
   namespace) is its convergence: the agent's watch and sync, BIRD's reload, BGP, BIRD's
   kernel export. Full mesh at every size, route reflectors (2, the mesh off) at the
   larger ones; the smallest mesh is the baseline of the ratio column.
2. Route scale through a reflector: a generator BIRD announces 10 000 block routes
   (5 000 nodes x 2 blocks) to a reflector that passes them to a client node (both
   configured by podnet's renderer); the time from the generator's routes being enabled
   until the client's kernel holds all of them, and each BIRD's memory.
3. Sessions and routes per node for a full mesh and for route reflectors at 100, 1 000
   and 5 000 nodes, counted in the configurations podnet renders (and their render time
   and `bird -p` time), next to the same counts read from BIRD in the largest lab.

Targets (issue): convergence under 3 s; 10 000 routes under 5 s and under 100 MB per BIRD.

    .venv/bin/python bench/bench_bgp.py [--quick] [--sizes 3,10,40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from podnet.bgp.bird import Bird  # noqa: E402
from podnet.bgp.config import compile_node  # noqa: E402
from podnet.bgp.control import command  # noqa: E402
from podnet.bgp.render import render  # noqa: E402
from podnet.bgp.scale import cluster, node_blocks, shape  # noqa: E402
from podnet.bgp.status import sessions  # noqa: E402
from podnet.ipam.allocator import IPAM  # noqa: E402
from podnet.lab import bgp as lab_bgp  # noqa: E402
from podnet.lab.cluster import down_by_name, open_lab_store, up  # noqa: E402
from podnet.lab.spec import parse_lab  # noqa: E402

RESULTS = HERE / "results"
TARGET_CONVERGENCE = 3.0
TARGET_SCALE_SECONDS = 5.0
TARGET_BIRD_MB = 100.0


def wait(check, what: str, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:g}s")
        time.sleep(every)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------ 1. convergence in labs


class RouteWatch:
    """`ip -n NS monitor route` in every namespace; when a prefix first appears in each."""

    MARK = "192.0.2.255"  # TEST-NET-1: a route each monitor must report before the watch counts

    def __init__(self, netns: list[str]):
        self.cond = threading.Condition()
        self.seen: dict[str, dict[str, float]] = {ns: {} for ns in netns}
        self.procs = [subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True,
                                       stderr=subprocess.DEVNULL) for ns in netns]
        for ns, p in zip(netns, self.procs, strict=True):
            threading.Thread(target=self._read, args=(ns, p), daemon=True).start()
        try:
            self._until_listening(netns)
        except BaseException:
            self.close()
            raise

    def _until_listening(self, netns: list[str], timeout: float = 60) -> None:
        """A monitor subscribes a while after it starts (long on a loaded machine) and misses
        what came before: a route to MARK is added in each namespace, and again, until its
        monitor reports it (a block's route could otherwise arrive unseen)."""
        deadline = time.monotonic() + timeout
        pending = list(netns)
        while pending:
            for ns in pending:
                subprocess.run(["ip", "-n", ns, "route", "del", f"{self.MARK}/32", "dev", "lo"], capture_output=True)
                sh("ip", "-n", ns, "route", "add", f"{self.MARK}/32", "dev", "lo")
            with self.cond:
                self.cond.wait_for(lambda waiting=pending: all(self.MARK in self.seen[ns] for ns in waiting), timeout=0.5)
            pending = [ns for ns in pending if self.MARK not in self.seen[ns]]
            if pending and time.monotonic() > deadline:
                raise SystemExit(f"ip monitor route not listening after {timeout:g}s in {', '.join(pending)}")
        for ns in netns:
            sh("ip", "-n", ns, "route", "del", f"{self.MARK}/32", "dev", "lo")

    def _read(self, ns: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            if line.startswith("Deleted"):
                continue
            dst = line.split(" ", 1)[0]
            with self.cond:
                self.seen[ns].setdefault(dst, now)
                self.cond.notify_all()

    def wait(self, prefix: str, among: list[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(prefix in self.seen[ns] for ns in among):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [ns for ns in among if prefix not in self.seen[ns]]
                    raise SystemExit(f"route {prefix} missing after {timeout:g}s in {', '.join(missing)}")
                self.cond.wait(left)
            return {ns: self.seen[ns][prefix] for ns in among}

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def lab_doc(name: str, nodes: int, reflectors: int) -> dict:
    node_list = []
    for i in range(nodes):
        rr = i < reflectors
        node_list.append({"name": f"n{i + 1}", "labels": {"route-reflector": "true"} if rr else {},
                          "bgp": {"routeReflectorClusterID": "244.0.0.1"} if rr else {}})
    manifests = [
        {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
         "spec": {"cidr": "10.230.0.0/16", "encapsulation": "None", "blockSize": 26}},
        {"apiVersion": "podnet.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": reflectors == 0}},
    ]
    if reflectors:
        manifests.append({"apiVersion": "podnet.io/v1", "kind": "BGPPeer", "metadata": {"name": "reflectors"},
                          "spec": {"peerSelector": {"matchLabels": {"route-reflector": "true"}}}})
    return {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"underlay": {"cidr": "10.96.128.0/24"}, "serviceCIDR": "10.95.0.0/16", "dnsServer": "inprocess",
                     "resyncSeconds": 600, "nodes": node_list, "manifests": manifests}}


def converge(nodes: int, reflectors: int, repeats: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="pnbenchbgp-"))
    root.chmod(0o755)
    name = f"bb-{secrets.token_hex(3)}"
    doc = lab_doc(name, nodes, reflectors)
    t = time.monotonic()
    st = up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=root, timeout=300)
    up_seconds = time.monotonic() - t
    try:
        ctls = {n["name"]: lab_bgp.node_bird(n).ctl for n in st.data["nodes"]}
        expect = {n: (nodes - 1 if reflectors == 0 else (nodes - 1 if i < reflectors else reflectors))
                  for i, n in enumerate(ctls)}

        def established() -> bool:
            for n, ctl in ctls.items():
                try:
                    found = sessions(ctl)
                except Exception:
                    return False
                if len(found) != expect[n] or not all(s.established for s in found):
                    return False
            return True

        t = time.monotonic()
        wait(established, "every session Established", 300, every=0.2)
        established_seconds = time.monotonic() - t
        watch = RouteWatch([n["netns"] for n in st.data["nodes"]])
        ipam = IPAM(open_lab_store(st))
        samples, per_node = [], []
        try:
            for r in range(repeats):
                owner = st.data["nodes"][(r * 7 + reflectors + 1) % nodes]
                t0 = time.monotonic()
                block = ipam.claim_block(owner["name"]).cidr
                times = watch.wait(block, [n["netns"] for n in st.data["nodes"] if n is not owner], 60)
                others = [v - t0 for v in times.values()]
                samples.append(max(others))
                per_node += others
        finally:
            watch.close()
        client = st.data["nodes"][-1]
        found = sessions(ctls[client["name"]])
        rr_found = sessions(ctls[st.data["nodes"][0]["name"]]) if reflectors else found
        birds = [lab_bgp.node_bird(n).pid() for n in st.data["nodes"]]
        return {"nodes": nodes, "reflectors": reflectors, "topology": f"{reflectors} RR" if reflectors else "mesh",
                "lab_up_s": round(up_seconds, 1), "established_s": round(established_seconds, 2),
                "convergence_p50_s": round(statistics.median(samples), 3), "convergence_max_s": round(max(samples), 3),
                "per_node_p50_s": round(statistics.median(per_node), 3),
                "client_sessions": len(found), "client_paths": sum(s.imported for s in found),
                "reflector_sessions": len(rr_found), "reflector_paths": sum(s.imported for s in rr_found),
                "bird_rss_mb_max": round(max(rss_mb(p) for p in birds if p), 1), "samples_s": samples}
    finally:
        down_by_name(name, root)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ 2. route scale through a reflector


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def route_scale(routes: int = 10000) -> dict:
    tag = f"pnbr{secrets.token_hex(2)}"
    fabric, names = f"{tag}-f", {r: f"{tag}-{r[0]}" for r in ("gen", "rr", "client")}
    addr = {"gen": "10.77.0.1", "rr": "10.77.0.2", "client": "10.77.0.3"}
    run = Path(tempfile.mkdtemp(prefix="pnbenchrr-"))
    run.chmod(0o755)
    made: list[str] = []
    birds: list[Bird] = []
    try:
        for ns in (fabric, *names.values()):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", fabric, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", fabric, "link", "set", "br0", "up")
        for i, (role, ns) in enumerate(names.items()):
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", fabric)
            sh("ip", "-n", ns, "addr", "add", f"{addr[role]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", fabric, "link", "set", f"p{i}", "master", "br0", "up")
        # The reflector and the client as podnet renders them; the generator is "node" gen.
        objs, config, peers, pools = cluster(3, 1)
        objs = [o.model_copy(update={"status": o.status.model_copy(update={"addresses": [
            a.model_copy(update={"address": addr[role]}) for a in o.status.addresses]}),
            "metadata": o.metadata.model_copy(update={"name": role})}) for o, role in zip(objs, ("rr", "gen", "client"),
                                                                                         strict=True)]
        for role in ("rr", "client"):
            cfg = compile_node(role, objs, config, peers, pools, [])
            b = Bird(run / role, netns=names[role])
            b.apply(render(cfg, b.log_file))
            birds.append(b)
        base = int(ipaddress.IPv4Network("10.0.0.0/8").network_address)
        statics = "".join(f"  route {ipaddress.IPv4Network((base + (n + 1) * 64, 26))} blackhole;\n"
                          for n in range(routes))
        gen = Bird(run / "gen", netns=names["gen"])
        gen.apply(f"router id {addr['gen']};\nprotocol device {{ }}\n"
                  f"protocol static gen_routes {{\n  disabled;\n  ipv4;\n{statics}}}\n"
                  f"protocol bgp to_rr {{\n  local {addr['gen']} as 64512;\n  neighbor {addr['rr']} as 64512;\n"
                  f"  ipv4 {{ import none; export all; }};\n}}\n")
        birds.append(gen)
        wait(lambda: all(s.established for s in sessions(birds[1].ctl)) and sessions(birds[1].ctl),
             "the client's sessions", 60)
        wait(lambda: all(s.established for s in sessions(gen.ctl)) and sessions(gen.ctl), "the generator's session", 60)

        def client_routes() -> int:
            out = subprocess.run(["ip", "-n", names["client"], "route", "show", "proto", "bird"], capture_output=True,
                                 text=True).stdout
            return out.count("\n")

        t0 = time.monotonic()
        command(gen.ctl, "enable gen_routes")
        rr_at = None
        while True:
            n = client_routes()
            if rr_at is None and sum(s.imported for s in sessions(birds[0].ctl)) >= routes:
                rr_at = time.monotonic() - t0
            if n >= routes:
                break
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"the client holds {n} of {routes} routes after 120 s")
            time.sleep(0.05)
        took = time.monotonic() - t0
        return {"routes": routes, "client_kernel_s": round(took, 2), "reflector_s": round(rr_at or took, 2),
                "rss_mb": {"generator": round(rss_mb(gen.pid()), 1), "reflector": round(rss_mb(birds[0].pid()), 1),
                           "client": round(rss_mb(birds[1].pid()), 1)}}
    finally:
        for b in birds:
            b.stop()
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(run, ignore_errors=True)


# ------------------------------------------------------------------ 3. sessions per node from rendered configs


def rendered_shapes(sizes: list[int], k: int) -> list[dict]:
    out = []
    for n in sizes:
        for topo, kk in (("mesh", 0), (f"{k} RR", k)):
            shapes = shape(n, kk)
            for role, s in shapes.items():
                check = _bird_parse_seconds(n, kk, role)
                out.append({"nodes": n, "topology": topo, "role": role, "sessions": s.sessions,
                            "paths_received": s.paths_received, "routes_installed": s.routes_installed,
                            "config_kb": round(s.config_bytes / 1024, 1), "render_ms": round(s.render_seconds * 1000, 1),
                            "bird_parse_ms": round(check * 1000, 1)})
    return out


def _bird_parse_seconds(n: int, k: int, role: str) -> float:
    objs, config, peers, pools = cluster(n, k)
    i = 0 if role == "reflector" else n - 1
    text = render(compile_node(objs[i].name, objs, config, peers, pools, node_blocks(i, 2)))
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as f:
        f.write(text)
        f.flush()
        t = time.perf_counter()
        subprocess.run([shutil.which("bird") or "/usr/sbin/bird", "-p", "-c", f.name], check=True, capture_output=True)
        return time.perf_counter() - t


# ------------------------------------------------------------------ report


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [cols] + [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 3,10; 3 repeats; 2 000 routes")
    ap.add_argument("--sizes", default="3,10,40")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--routes", type=int, default=10000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_bgp needs root (network namespaces)")
    sizes = [3, 10] if args.quick else [int(x) for x in args.sizes.split(",")]
    repeats = 3 if args.quick else args.repeats
    routes = 2000 if args.quick else args.routes

    conv = []
    for n in sizes:
        conv.append(converge(n, 0, repeats))
        print(f"mesh {n}: {conv[-1]['convergence_p50_s']} s", flush=True)
        if n >= 10:
            conv.append(converge(n, 2, repeats))
            print(f"2 RR {n}: {conv[-1]['convergence_p50_s']} s", flush=True)
    base = conv[0]["convergence_p50_s"]
    for r in conv:
        r["vs_smallest_mesh"] = round(r["convergence_p50_s"] / base, 2) if base else None
        r["target_met"] = r["convergence_max_s"] < TARGET_CONVERGENCE
    scale = route_scale(routes)
    scale["target_met"] = (scale["client_kernel_s"] < TARGET_SCALE_SECONDS
                           and max(scale["rss_mb"].values()) < TARGET_BIRD_MB)
    shapes = rendered_shapes([100, 1000, 5000], 3)

    print("\nConvergence: block claimed -> route in every other node's kernel (real agents and BIRD)")
    print(table(conv, ["topology", "nodes", "client_sessions", "reflector_sessions", "convergence_p50_s",
                       "convergence_max_s", "per_node_p50_s", "vs_smallest_mesh", "established_s", "bird_rss_mb_max",
                       "target_met"]))
    print(f"\nRoute scale: {scale['routes']} routes, generator -> reflector -> client kernel")
    print(table([{**scale, **{f"rss_{k}_mb": v for k, v in scale["rss_mb"].items()}}],
                ["routes", "reflector_s", "client_kernel_s", "rss_generator_mb", "rss_reflector_mb", "rss_client_mb",
                 "target_met"]))
    print("\nSessions and routes per node, from the configurations podnet renders (2 blocks per node)")
    print(table(shapes, ["nodes", "topology", "role", "sessions", "paths_received", "routes_installed", "config_kb",
                         "render_ms", "bird_parse_ms"]))
    measured = [r for r in conv if r["nodes"] == max(sizes)]
    print(f"\nMeasured in the lab at {max(sizes)} nodes (BIRD's own counts, a client's and a reflector's):")
    print(table(measured, ["topology", "nodes", "client_sessions", "client_paths", "reflector_sessions",
                           "reflector_paths"]))
    RESULTS.mkdir(exist_ok=True)
    out = {"convergence": conv, "route_scale": scale, "rendered": shapes,
           "targets": {"convergence_s": TARGET_CONVERGENCE, "scale_s": TARGET_SCALE_SECONDS, "bird_mb": TARGET_BIRD_MB}}
    (RESULTS / "bgp.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {RESULTS / 'bgp.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
