"""Bringing a lab up and down: topology, store objects, agents, pods and their servers.

`up` plays the parts of the API server (objects, ClusterIPs) and the kubelet and
containerd (pod sandboxes, CNI ADD through a conflist, pod status), and starts the
endpoint controller (endpointcontroller.py), a process that keeps EndpointSlices in
step with the store for as long as the lab is up. With podnet as the CNI, every node
runs an agent and (`spec.dnsServer: separate`, the default) a node DNS process
(`podnet dns serve`) beside it, as the two containers of the agent's DaemonSet. `down`
undoes whatever `state.json` says was made, even after a crash.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from podnet.cluster import ensure_cluster_config
from podnet.dns import resolvconf
from podnet.ebpf.bpffs import ensure_shared_bpffs
from podnet.errors import PodnetError
from podnet.lab import bgp as lab_bgp
from podnet.lab import topology
from podnet.lab.endpoints import MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from podnet.lab.runtime import (
    CNIError,
    CniRuntime,
    RuntimeConf,
    k8s_args,
    max_common_version,
    pod_capability_args,
    result_ips,
)
from podnet.lab.spec import LabSpec
from podnet.lab.state import LabState, all_labs, lab_root
from podnet.model.objects import KINDS, EndpointSlice, KubeObject, Pod, PodIP, PodStatus, Service
from podnet.model.selectors import LabelSelector
from podnet.services.clusterip import allocate_cluster_ips, release_service
from podnet.store import Conflict, open_store
from podnet.store.base import KeyValueStore
from podnet.store.credentials import EtcdCredentials, from_env
from podnet.store.layout import SHARED
from podnet.store.objects import ObjectStore, key_of
from podnet.store.url import etcd_target, is_etcd

REFERENCE_CNI_DIR = "/usr/lib/cni"
NETWORK_NAME = "podnet"
DEFAULT_TIMEOUT = 30.0
LOG_TAIL_LINES = 20
AGENT_METRICS_PORT = 9102  # each agent's /metrics, /healthz and /readyz, on its node's address

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def cni_path(st: LabState) -> list[str]:
    extra = [d for d in os.environ.get("PODNET_LAB_CNI_PATH", "").split(os.pathsep) if d]
    return [str(st.dir / "bin"), *extra, REFERENCE_CNI_DIR]


def podnet_command() -> list[str]:
    exe = Path(sys.executable).parent / "podnet"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "podnet.cli.main"]


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  | (log is empty)"


# ====================================================================== finding labs


def find_lab(name: str | None, root: Path | None = None) -> LabState:
    """The lab called `name`, or the only lab there is."""
    if name is None:
        labs = all_labs(root)
        if not labs:
            raise PodnetError(f"no lab is up (nothing in {root or lab_root()})")
        if len(labs) > 1:
            raise PodnetError(f"several labs are up ({', '.join(labs)}): choose one with --name")
        name = labs[0]
    st = LabState.open(name, root)
    if st is None:
        raise PodnetError(f"no lab named {name!r} (labs: {', '.join(all_labs(root)) or 'none'})")
    return st


# ====================================================================== up


def up(spec: LabSpec, *, name: str | None = None, store_url: str | None = None, root: Path | None = None,
       timeout: float = DEFAULT_TIMEOUT, keep_on_failure: bool = False, say: Say = _quiet,
       store_credentials: EtcdCredentials | None = None, source: str = "store") -> LabState:
    """Bring a lab up. On failure everything made so far is removed (unless keep_on_failure).
    store_credentials: for an etcd store_url (default: the environment's). source: "store" (the
    lab writes its objects into the store) or "kubernetes" (an API server, kube-sync between it
    and the store: lab/kubesource.py)."""
    name = name or spec.name
    if source == "kubernetes":  # refused before anything is made
        from podnet.lab import kubesource

        kubesource.fake_apiserver_source()
        kubesource.check_supported(spec)
    elif source != "store":
        raise PodnetError(f"lab source {source!r}: expected store or kubernetes")
    st = LabState.create(name, root, file=str(Path(spec.file).resolve()) if spec.file else None,
                         cni=spec.cni.plugin)
    try:
        try:
            _up(st, spec, store_url, timeout, say, store_credentials, source)
        except PodnetError:
            raise
        except Exception as e:  # netlink, OS and subprocess errors: one line, with the lab's name
            raise PodnetError(f"lab {name}: {type(e).__name__}: {e}") from e
    except BaseException as e:
        st.set(phase="failed", error=str(e))
        st.unlock()
        if not keep_on_failure:
            with contextlib.suppress(Exception):
                down(st, say=_quiet)
        raise
    st.set(phase="up")
    st.unlock()
    return st


def _up(st: LabState, spec: LabSpec, store_url: str | None, timeout: float, say: Say,
        creds: EtcdCredentials | None = None, source: str = "store") -> None:
    url = store_url or f"sqlite://{st.dir / 'store.db'}"
    if is_etcd(url):
        url, _, tls, creds = etcd_target(url, creds)  # the URL the lab records holds no password
        if tls:
            raise PodnetError("the lab cannot use an etcd store over TLS: its nodes reach the store through a relay "
                              "whose address the members' certificates do not name")
        st.save_store_credentials(creds.environment())
    st.set(store=url, store_owned=store_url is None, underlay=str(spec.underlay), gateway=spec.gateway,
           external=spec.external.address if spec.external else None, source=source)
    say(f"lab {st.name} (id {st.id}): state in {st.dir}, store {url}")

    # Topology: the underlay, then one namespace per node.
    ul = st.netns_name("ul")
    st.set(underlay_netns=ul)
    st.record_netns(ul)
    topology.create_netns(ul)
    topology.build_underlay(ul, str(spec.underlay), spec.gateway, spec.external.address if spec.external else None)
    segments = {None: ul}  # rack (None: the underlay) -> the namespace of the bridge its nodes hang on
    for i, rack in enumerate(spec.racks, start=1):
        tor = st.netns_name(f"t{i}")
        st.record_netns(tor)
        topology.create_netns(tor)
        gw = topology.build_rack(ul, tor, i, spec.tor_address(rack.name), str(spec.underlay), spec.gateway, rack.cidr)
        st.data.setdefault("racks", []).append({"name": rack.name, "netns": tor, "cidr": rack.cidr, "gateway": gw,
                                                "uplink": spec.tor_address(rack.name)})
        segments[rack.name] = tor
        say(f"rack {rack.name}: {rack.cidr} behind its ToR in netns {tor} ({spec.tor_address(rack.name)} on the "
            "underlay)")
    for n in spec.nodes:
        ns = st.netns_name(str(n.index))
        sock = st.dir / f"{n.name}.sock"
        if len(str(sock)) > 100:
            raise PodnetError(f"agent socket path {sock} is too long for a unix socket: use a shorter "
                              "PODNET_LAB_ROOT or lab name")
        st.data["nodes"].append({"name": n.name, "index": n.index, "netns": ns, "address": n.address,
                                 "service_proxy": n.service_proxy, "rack": n.rack,
                                 "policy_dataplane": n.policy_dataplane,
                                 "socket": str(sock), "log": str(st.dir / f"{n.name}.log"),
                                 "conflist": str(st.dir / f"{n.name}.conflist")})
        st.record_netns(ns)
        topology.create_netns(ns)
        cidr, gateway = spec.segment(n)
        topology.attach_node(segments[n.rack], ns, n.index, n.address, cidr, gateway)
        say(f"node {n.name}: {n.address} in netns {ns}")
    if spec.data_network is not None:  # a second segment for pods' additional networks
        data = spec.data_network
        dns = st.netns_name("d")
        st.record_netns(dns)
        topology.create_netns(dns)
        topology.build_data_segment(dns, data.external.address if data.external else None)
        for node in st.data["nodes"]:
            topology.attach_data(dns, node["netns"], node["index"])
        st.set(data_netns=dns, data_cidr=data.cidr, data_external=data.external.address if data.external else None)
        say(f"data network {data.cidr}: every node's {topology.DATA_IF} on the bridge in netns {dns}")
    if spec.external is not None and spec.external.dns is not None:
        _start_external_dns(st, spec, ul, timeout, say)
    lab_bgp.start_lab_routers(st, spec, ul, say)  # the routers BGP nodes peer with
    cloud_objects: list[KubeObject] = []
    provider_ids: dict[str, str] = {}
    if spec.cloud is not None:  # the EC2 API, the VPC (cloud fabric) and its host
        from podnet.lab import cloud as lab_cloud

        cloud_objects, provider_ids = lab_cloud.setup(st, spec.cloud, st.data["nodes"], str(spec.underlay),
                                                      spec.gateway, timeout, say)

    # The API server's part: every object, Pods still Pending (with --source kubernetes, a real
    # API server's, and kube-sync writes the store).
    kube = None
    if source == "kubernetes":
        from podnet.lab import kubesource

        kube = kubesource.start(st, url, spec.service_cidr, timeout, say)
    store = ObjectStore(open_lab_store(st, url, create=True))
    # The cluster's configuration, as the first `podnet apply` on a store writes it: later
    # applies to the lab's store and its agents read the lab's Service CIDR from there.
    ensure_cluster_config(store.kv, service_cidr=spec.service_cidr,
                          origin=f"{spec.file or 'the lab'}: field spec.serviceCIDR")
    # ClusterIPs and nodePorts as `podnet apply` allocates them: keys in the store, so later
    # applies into the lab's store never hand out the same ones.
    objects: list[KubeObject] = allocate_cluster_ips(spec.objects, store, spec.service_cidr) if kube is None \
        else list(spec.objects)  # the API server allocates them
    services = [o for o in objects if isinstance(o, Service)]
    pods = [p.with_meta(uid=str(uuid.uuid4())) for p in spec.pods]
    pods = [p.model_copy(update={"status": PodStatus(phase="Pending")}) for p in pods]  # type: ignore[misc]
    nodes = [n.model_copy(update={"spec": n.spec.model_copy(update={"provider_id": provider_ids[n.name]})})
             if n.name in provider_ids else n for n in spec.node_objects()]
    applied = [*objects, *cloud_objects, *nodes, *pods]
    st.set(objects=[_ref_key(o) for o in applied])
    if kube is None:
        last_status, _ = store.apply(applied)
        # The endpoint controller's part, from now until `lab down`: slices follow the pods.
        _start_endpoint_controller(st, url, timeout, say)
    else:
        made = kubesource.create_all(kube, applied)
        pods = [p.with_meta(uid=made[key_of(p)]["metadata"]["uid"]) for p in pods]  # the API's uids
        last_status = 0
        kubesource.start_endpoint_controller(st, timeout, say)

    # CNI: podnet-cni with one agent per node, or the reference bridge.
    if spec.cni.plugin == "podnet":
        agent_url = _relay_store(st, url, ul, spec.gateway, timeout, say) if is_etcd(url) else url
        _setup_podnet(st, spec, agent_url, timeout, say,
                      ["--pod-wait", str(kubesource.POD_WAIT)] if kube is not None else [])
    else:
        _setup_bridge(st, spec, say)

    # The outside world.
    if spec.external is not None:
        ext_ip = str(ipaddress.ip_interface(spec.external.address).ip)
        _start_server(st, "external", spec.external.name, ul,
                      [(p.protocol.lower(), p.container_port) for p in spec.external.ports], bind=ext_ip)
        say(f"external host {spec.external.name}: {ext_ip} in netns {ul}")
    if spec.data_network is not None and spec.data_network.external is not None:
        dext = spec.data_network.external
        dext_ip = str(ipaddress.ip_interface(dext.address).ip)
        entry = _start_server(st, DATA_EXTERNAL, dext.name, st.data["data_netns"],
                              [(p.protocol.lower(), p.container_port) for p in dext.ports], bind=dext_ip)
        _wait_servers(st, [entry], timeout)
        say(f"data network host {dext.name}: {dext_ip} in netns {st.data['data_netns']}")
    if spec.cloud is not None:
        host = spec.cloud.vpc_host
        host_ip = str(ipaddress.ip_interface(host.address).ip)
        entry = _start_server(st, lab_cloud.VPC_HOST_KEY, host.name, st.data["cloud"]["vpc_host_netns"],
                              lab_cloud.vpc_host_ports(spec.cloud), bind=host_ip)
        _wait_servers(st, [entry], timeout)
        say(f"VPC host {host.name}: {host_ip} in netns {st.data['cloud']['vpc_host_netns']}")

    # The kubelet's part: sandbox, CNI ADD, the pod's server (in parallel); status (here).
    runtimes = {n["name"]: node_runtime(st, n) for n in st.data["nodes"]}
    servers: list[dict] = []
    failures: list[BaseException] = []
    entries = [_pod_entry(st, j, pod) for j, pod in enumerate(pods)]
    st.set(pods=entries)  # every pod recorded, in order, before any sandbox exists
    with ThreadPoolExecutor(max_workers=POD_WORKERS) as workers:
        futures = {workers.submit(_start_pod, st, entry, pod, runtimes, spec.cni.plugin): pod
                   for entry, pod in zip(entries, pods, strict=True)}
        for fut in as_completed(futures):
            pod = futures[fut]
            try:
                entry, server = fut.result()
            except BaseException as e:
                failures.append(e)
                continue
            if server is not None:
                servers.append(server)
            node = find_node(st, entry["node"])
            last_status = max(last_status, _set_running(store, pod, entry["ips"], node["address"]) if kube is None
                              else kubesource.set_running(kube, pod, entry["ips"], node["address"]))
            say(f"pod {pod.namespace}/{pod.name} on {node['name']}: {', '.join(entry['ips']) or 'no address'}"
                f" (netns {entry['netns']})")
    if failures:
        raise failures[0]
    _wait_servers(st, servers, timeout)

    # Every pod's status is in the slices, and (podnet) every agent has programmed them.
    wait_endpoints(st, last_status, timeout)
    if kube is not None:  # and kube-sync has brought all of it into the store
        kubesource.wait_reflected(st, kube, store.kv, timeout)
    slices = [s for svc in services for s in store.list(EndpointSlice, svc.namespace, _slices_of(svc.name))]
    if slices:
        say(f"endpoint slices: {', '.join(s.namespace + '/' + s.name for s in slices)}")
    if spec.cni.plugin == "podnet":
        wait_programmed(st, followed_revision(store.kv), timeout)


ENDPOINT_CONTROLLER = "endpoint-controller"


def store_env(st: LabState) -> dict[str, str]:
    """Variables that give a process the lab store's credentials (every process the lab starts
    gets them: LabState.start_process)."""
    return st.store_env()


def open_lab_store(st: LabState, url: str | None = None, *, create: bool = False) -> KeyValueStore:
    """The lab's store (`url`: default the one it records), with the credentials its processes use."""
    return open_store(url or st.data["store"], create=create, credentials=from_env({**os.environ, **st.store_env()}))


def _slices_of(service: str) -> LabelSelector:
    return LabelSelector(match_labels={SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY})


def _start_endpoint_controller(st: LabState, url: str, timeout: float, say: Say) -> None:
    """Start the EndpointSlice controller on the lab's store (from this namespace, which
    reaches the store as `lab up` does) and wait for its first reconcile."""
    ready = st.dir / f"{ENDPOINT_CONTROLLER}.ready"
    synced = st.dir / f"{ENDPOINT_CONTROLLER}.synced"
    entry = st.start_process(ENDPOINT_CONTROLLER, [sys.executable, "-m", "podnet.lab.endpointcontroller", "--store",
                                                   url, "--synced-file", str(synced), "--ready-file", str(ready)],
                             role="controller", ready=str(ready), synced=str(synced), server=ENDPOINT_CONTROLLER)
    _wait_servers(st, [entry], timeout)
    say(f"endpoint controller: pid {entry['pid']}, log {entry['log']}")


def wait_endpoints(st: LabState, revision: int, timeout: float) -> None:
    """Wait until the lab's endpoint controller has written every EndpointSlice change that
    the store's objects up to `revision` call for (it writes that revision to its synced
    file); its own writes then precede the store's current revision."""
    entry = st.process(ENDPOINT_CONTROLLER)
    if entry is None:
        raise PodnetError(f"lab {st.name} has no endpoint controller")
    deadline = time.monotonic() + timeout
    path = Path(entry["synced"])
    while True:
        try:
            if int(path.read_text().strip() or 0) >= revision:
                return
        except (OSError, ValueError):
            pass
        if st.process_pid(entry) is None:
            raise PodnetError(f"the endpoint controller exited; log {entry['log']}:\n{log_tail(entry['log'])}")
        if time.monotonic() > deadline:
            raise PodnetError(f"the endpoint controller has not reconciled store revision {revision} within "
                              f"{timeout:g}s; log {entry['log']}:\n{log_tail(entry['log'])}")
        time.sleep(0.05)


def followed_revision(kv: KeyValueStore) -> int:
    """The revision of the last change under what agents follow (SHARED). The store's own
    revision can be a later write no agent sees (its readiness record, a CNI attachment
    record, under ALLOC), which no node's .synced would ever reach: a lab without pods
    would wait for it to the end of its timeout. Lab up deletes nothing under SHARED, so
    the newest record there is the last change."""
    records, _ = kv.list(SHARED)
    return max((r.revision for r in records), default=0)


def wait_programmed(st: LabState, revision: int, timeout: float) -> None:
    """Wait until every node's agent has programmed the store up to `revision` (each agent
    writes the revision it has synced next to its CNI socket), and every node DNS process
    answers from it (its synced file)."""
    deadline = time.monotonic() + timeout
    for node in st.data["nodes"]:
        waits = [(f"agent {node['name']} has not programmed", Path(node["socket"] + ".synced"), node["log"])]
        dns = st.process(node_dns_key(node["name"]))
        if dns is not None:
            waits.append((f"the DNS process of {node['name']} has not followed", Path(dns["synced"]), dns["log"]))
        for what, path, log in waits:
            while True:
                try:
                    if int(path.read_text().strip() or 0) >= revision:
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise PodnetError(f"{what} store revision {revision} within {timeout:g}s; log {log}:\n"
                                      f"{log_tail(log)}")
                time.sleep(0.05)


POD_WORKERS = 4


def _pod_entry(st: LabState, j: int, pod: Pod) -> dict:
    node = find_node(st, pod.spec.node_name or "")
    host = pod.spec.host_network
    return {"index": j, "namespace": pod.namespace, "name": pod.name, "node": node["name"],
            "netns": node["netns"] if host else st.netns_name(f"p{j}"), "containerId": secrets.token_hex(32),
            "uid": pod.metadata.uid, "ips": [], "added": False, "hostNetwork": host}


def _start_pod(st: LabState, entry: dict, pod: Pod, runtimes: dict[str, CniRuntime],
               plugin: str) -> tuple[dict, dict | None]:
    node = find_node(st, entry["node"])
    ns = entry["netns"]
    if entry["hostNetwork"]:  # no sandbox of its own, no CNI: the node's namespace and address
        entry["ips"] = [node["address"]]
    else:
        st.record_netns(ns)
        topology.create_netns(ns)
        if plugin == "podnet":  # the node's DNS server answers; the pod's resolver searches as in Kubernetes
            topology.write_netns_file(ns, "resolv.conf", resolvconf.render(pod.namespace or "default",
                                                                           resolvconf.NODE_DNS_ADDRESS))
        with st.mutex:
            entry["attempted"] = True
            st.save()
        try:
            result = runtimes[node["name"]].add(pod_runtime_conf(entry, pod))
        except CNIError as e:
            raise PodnetError(f"pod {pod.namespace}/{pod.name} on {node['name']}: {e}"
                              + (f"\nagent log {node['log']}:\n{log_tail(node['log'])}"
                                 if plugin == "podnet" else "")) from None
        entry["ips"], networks = split_result(result, "eth0")
        if networks:
            entry["networks"] = networks  # additional networks: {interface: [addresses]}
    with st.mutex:
        entry["added"] = True
        st.save()
    ports = [(p.protocol.lower(), p.container_port) for c in pod.spec.containers for p in c.ports]
    server = _start_server(st, f"pod-{entry['index']}", pod.name, ns, ports) if ports else None
    return entry, server


DATA_EXTERNAL = "data-external"


def split_result(result: dict, ifname: str) -> tuple[list[str], dict[str, list[str]]]:
    """The pod's own addresses (those of ifname, as the runtime reports the pod IP), and the
    addresses of each other pod interface (its additional networks)."""
    ifaces = result.get("interfaces") or []
    names = {i: it.get("name") for i, it in enumerate(ifaces) if it.get("sandbox")}
    if not any(n != ifname for n in names.values()):
        return result_ips(result), {}
    own: list[str] = []
    others: dict[str, list[str]] = {}
    for ip in result.get("ips") or []:
        if "address" not in ip:
            continue
        name = names.get(ip.get("interface"), ifname)
        (own if name == ifname else others.setdefault(name, [])).append(ip["address"].split("/")[0])
    return own, others


def _ref_key(o: KubeObject) -> list:
    return [o.KIND, o.name, o.namespace]


def _set_running(store: ObjectStore, pod: Pod, ips: list[str], host_ip: str) -> int:
    for _ in range(5):
        current = store.get(Pod, pod.name, pod.namespace)
        if current is None:
            raise PodnetError(f"pod {pod.namespace}/{pod.name} vanished from the store")
        status = PodStatus(phase="Running", pod_ip=ips[0] if ips else None,
                           pod_ips=[PodIP(ip=i) for i in ips] or None, host_ip=host_ip)
        try:
            return store.update(current.model_copy(update={"status": status}))
        except Conflict:
            continue
    raise PodnetError(f"pod {pod.namespace}/{pod.name}: status update kept conflicting")


def pod_runtime_conf(entry: dict, pod: Pod | None = None) -> RuntimeConf:
    return RuntimeConf(
        container_id=entry["containerId"], netns=f"/run/netns/{entry['netns']}", ifname="eth0",
        args=k8s_args(entry["namespace"], entry["name"], entry["containerId"], entry["uid"]),
        capability_args=pod_capability_args(pod) if pod is not None else {},
    )


def node_runtime(st: LabState, node: dict, timeout: float = 60.0) -> CniRuntime:
    conflist = Path(node["conflist"]).read_text()
    return CniRuntime(conflist, cni_path=cni_path(st), cache_dir=st.dir / "cni-cache",
                      host_netns=node["netns"], timeout=timeout)


# ---------------------------------------------------------------------- podnet-cni + agents


def _setup_podnet(st: LabState, spec: LabSpec, url: str, timeout: float, say: Say,
                  agent_args: list[str] | None = None) -> None:
    try:
        import podnet.agent  # noqa: F401
        import podnet.cni  # noqa: F401
    except ModuleNotFoundError as e:
        raise PodnetError(f"cni plugin podnet needs {e.name}, which is not installed; "
                          "use `cni: {plugin: bridge}` for a lab with the reference plugins") from None
    bindir = st.dir / "bin"
    st.set(bindir=str(bindir))
    bindir.mkdir(exist_ok=True)
    # agents run by `ip netns exec` (a /sys of their own): an eBPF dataplane pins into this
    # bpffs, mounted here on the host side so that a restarted agent finds its pins
    ensure_shared_bpffs()
    proc = subprocess.run([sys.executable, "-m", "podnet.cni.install", str(bindir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PodnetError(f"installing podnet-cni into {bindir} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    chain = spec.cni.chain_configs()
    version = spec.cni.cni_version
    for n in st.data["nodes"]:
        conflist = {"cniVersion": version or "1.0.0", "name": NETWORK_NAME,
                    "plugins": [{"type": "podnet-cni", "agentSocket": n["socket"]}, *chain]}
        if version is None:
            probe = CniRuntime(conflist, cni_path=cni_path(st), cache_dir=st.dir / "cni-cache")
            version = max_common_version(probe.plugin_versions(p["type"]) for p in conflist["plugins"])
            conflist["cniVersion"] = version
        Path(n["conflist"]).write_text(json.dumps(conflist, indent=1) + "\n")

    addresses = ["--cluster-dns-ip", spec.cluster_dns_ip] if spec.cluster_dns_ip else []
    upstream = ["--dns-upstream", str(ipaddress.ip_interface(spec.external.address).ip)] \
        if spec.external is not None and spec.external.dns is not None else []
    separate = spec.dns_server == "separate"
    st.set(dns_server=spec.dns_server)
    servers = []
    for n in st.data["nodes"]:
        if separate:  # before the agent: it listens on 169.254.20.10 before the agent puts it on lo
            servers.append(_start_node_dns(st, n, url, addresses + upstream))
        argv = [*podnet_command(), "--store", url, "agent", "--node", n["name"], "--socket", n["socket"],
                "--service-proxy", n.get("service_proxy", "nftables"),
                "--policy-dataplane", n.get("policy_dataplane", "nftables"),
                "--resync", str(spec.resync_seconds), "--dns-server", spec.dns_server,
                "--metrics-port", str(AGENT_METRICS_PORT),
                *addresses, *([] if separate else upstream),  # separate: the agent answers nothing
                *(agent_args or [])]
        entry = st.start_process(f"agent-{n['name']}", argv, netns=n["netns"], log=Path(n["log"]),
                                 role="agent", node=n["name"])
        say(f"agent {n['name']}: pid {entry['pid']}, log {n['log']}")
    _wait_servers(st, servers, timeout)
    for entry in servers:
        say(f"node DNS {entry['node']}: pid {entry['pid']}, log {entry['log']}")
    for n in st.data["nodes"]:
        wait_agent(st, n, timeout)


def node_dns_key(node: str) -> str:
    return f"dns-{node}"


def _start_node_dns(st: LabState, node: dict, url: str, dns_args: list[str]) -> dict:
    """`podnet dns serve` in the node's namespace, following the store as the agent does."""
    key = node_dns_key(node["name"])
    ready, synced = st.dir / f"{key}.ready", st.dir / f"{key}.synced"
    argv = [*podnet_command(), "--store", url, "dns", "serve", "--node", node["name"], *dns_args,
            "--ready-file", str(ready), "--synced-file", str(synced)]
    return st.start_process(key, argv, netns=node["netns"], role="node-dns", node=node["name"], ready=str(ready),
                            synced=str(synced), server=f"node DNS {node['name']}")


RELAY_FIRST_PORT = 23790


def _relay_store(st: LabState, url: str, underlay_netns: str, gateway: str, timeout: float, say: Say) -> str:
    """etcd endpoints as agents inside node namespaces reach them: through a relay on the gateway.

    The relay's listeners live in the underlay namespace, its connections leave from this
    one, so a store on this host's loopback serves the lab's nodes as well.
    """
    endpoints = [e.strip().removeprefix("http://").rstrip("/") for e in url[len("etcd://"):].split(",") if e.strip()]
    maps, relayed = [], []
    for i, ep in enumerate(endpoints):
        port = RELAY_FIRST_PORT + i
        maps += ["--map", f"{gateway}:{port}={ep}"]
        relayed.append(f"{gateway}:{port}")
    ready = st.dir / "store-relay.ready"
    entry = st.start_process("store-relay", [sys.executable, "-m", "podnet.lab.forward", "--netns",
                                             f"/run/netns/{underlay_netns}", *maps, "--ready-file", str(ready)],
                             role="relay", ready=str(ready), server="store-relay")
    _wait_servers(st, [entry], timeout)
    agent_url = "etcd://" + ",".join(relayed)
    st.set(agent_store=agent_url)
    say(f"store relay: {agent_url} in the underlay -> {url} (pid {entry['pid']})")
    return agent_url


def agent_status(st: LabState, node: dict, timeout: float = 5.0) -> CNIError | None:
    """None when the agent answers STATUS through podnet-cni; the error otherwise."""
    rt = CniRuntime({"cniVersion": "1.1.0", "name": NETWORK_NAME,
                     "plugins": [{"type": "podnet-cni", "agentSocket": node["socket"]}]},
                    cni_path=cni_path(st), cache_dir=st.dir / "cni-cache", host_netns=node["netns"],
                    timeout=timeout)
    try:
        rt.invoke({**rt.plugins[0], "name": rt.name, "cniVersion": rt.cni_version}, "STATUS", None)
    except CNIError as e:
        return e
    return None


def restart_agent(st: LabState, node_name: str, timeout: float = 60.0, kill: bool = False,
                  while_down: Callable[[], None] = lambda: None, options: dict[str, str] | None = None) -> dict:
    """Stop a node's agent (`kill`: with SIGKILL, as a crash), run `while_down`, and start it
    again with the same command, or with `options` (flag -> value) given other values (a
    node switched to another dataplane); returns the new record."""
    node = find_node(st, node_name)
    entry = st.process(f"agent-{node_name}")
    if entry is None:
        raise PodnetError(f"lab {st.name} has no agent on node {node_name!r}")
    if options:
        command = list(entry["command"])
        for flag, value in options.items():
            if flag not in command:
                raise PodnetError(f"agent {node_name}: its command has no {flag}")
            command[command.index(flag) + 1] = value
        entry = {**entry, "command": command}
    new = _restart(st, entry, kill, while_down)
    wait_agent(st, node, timeout)
    return new


def restart_node_dns(st: LabState, node_name: str, timeout: float = 60.0, kill: bool = False,
                     while_down: Callable[[], None] = lambda: None) -> dict:
    """restart_agent for a node's DNS process; returns once the new one listens."""
    find_node(st, node_name)
    entry = st.process(node_dns_key(node_name))
    if entry is None:
        raise PodnetError(f"lab {st.name} has no DNS process on node {node_name!r} (spec.dnsServer: inprocess?)")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry["ready"])  # the new process writes it again once it listens
    new = _restart(st, entry, kill, while_down)
    _wait_servers(st, [new], timeout)
    return new


def _restart(st: LabState, entry: dict, kill: bool, while_down: Callable[[], None]) -> dict:
    st.stop_process(entry, first=signal.SIGKILL if kill else signal.SIGTERM)
    while_down()
    info = {k: v for k, v in entry.items()
            if k not in ("key", "argv", "command", "pidfile", "log", "pid", "starttime", "netns")}
    return st.start_process(entry["key"], entry["command"], netns=entry.get("netns"), log=Path(entry["log"]),
                            **info)


def wait_agent(st: LabState, node: dict, timeout: float) -> None:
    entry = st.process(f"agent-{node['name']}")
    assert entry is not None
    deadline = time.monotonic() + timeout
    err: CNIError | None = None
    while time.monotonic() < deadline:
        if st.process_pid(entry) is None:
            raise PodnetError(f"agent {node['name']} exited during start-up; log {node['log']}:\n"
                              f"{log_tail(node['log'])}")
        if os.path.exists(node["socket"]):
            err = agent_status(st, node)
            if err is None:
                return
        time.sleep(0.2)
    raise PodnetError(f"agent {node['name']} did not answer STATUS within {timeout:g}s"
                      f"{f' ({err.msg})' if err else ''}; log {node['log']}:\n{log_tail(node['log'])}")


# ---------------------------------------------------------------------- reference bridge


def _setup_bridge(st: LabState, spec: LabSpec, say: Say) -> None:
    """bridge + host-local, one block of the first pool per node, direct routes between nodes."""
    pool = spec.pools[0]
    pool_net = ipaddress.ip_network(pool.spec.cidr)
    size = 2 ** ((32 if pool_net.version == 4 else 128) - (pool.spec.block_size or 26))
    blocks = {}
    for n in st.data["nodes"]:
        block = ipaddress.ip_network(f"{pool_net.network_address + (n['index'] - 1) * size}/{pool.spec.block_size}")
        blocks[n["name"]] = str(block)
        n["podCIDR"] = str(block)
        conflist = {"cniVersion": spec.cni.cni_version or "1.0.0", "name": NETWORK_NAME, "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": str(block)}]], "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": str(st.dir / "ipam" / n["name"])}},
            *spec.cni.chain_configs()]}
        Path(n["conflist"]).write_text(json.dumps(conflist, indent=1) + "\n")
    st.save()
    for n in st.data["nodes"]:
        for m in st.data["nodes"]:
            if m is not n:
                topology.add_route(n["netns"], blocks[m["name"]], m["address"])
        if pool.spec.nat_outgoing:
            topology.masquerade_pods(n["netns"], str(pool_net))
        say(f"node {n['name']}: pod block {blocks[n['name']]} (bridge cni0, host-local)")


# ---------------------------------------------------------------------- servers


def _start_server(st: LabState, key: str, name: str, netns: str, ports: list[tuple[str, int]],
                  bind: str | None = None) -> dict:
    ready = st.dir / f"{key}.ready"
    argv = [sys.executable, "-m", "podnet.lab.podserver", "--name", name, "--ready-file", str(ready)]
    argv += [a for proto, port in ports for a in ("--port", f"{proto}:{port}")]
    if bind:
        argv += ["--bind", bind]
    return st.start_process(key, argv, netns=netns, role="server", ready=str(ready), server=name)


def _start_external_dns(st: LabState, spec: LabSpec, netns: str, timeout: float, say: Say) -> None:
    """dnsmasq on the external address: the test zone's records, NXDOMAIN for every other name,
    each query logged to its log. The nodes' resolv.conf names it (the agents read their host
    search domains there: none)."""
    assert spec.external is not None and spec.external.dns is not None
    if shutil.which("dnsmasq") is None:
        raise PodnetError("spec.external.dns needs dnsmasq, which is not installed (Debian: dnsmasq-base)")
    ip = str(ipaddress.ip_interface(spec.external.address).ip)
    hosts = st.dir / "external-dns.hosts"
    hosts.write_text("".join(f"{address} {name}\n" for name, address in spec.external.dns_hosts()))
    argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces",
            f"--listen-address={ip}", "--port=53", f"--addn-hosts={hosts}", "--local=/#/", "--local-ttl=30",
            "--cache-size=0", "--user=root", f"--pid-file={st.dir / 'external-dns.dnsmasq.pid'}",
            "--log-queries", "--log-facility=-"]
    entry = st.start_process("external-dns", argv, netns=netns, role="dns", server="external-dns")
    deadline = time.monotonic() + timeout
    while not _udp_bound(entry, ip, 53):
        if st.process_pid(entry) is None:
            raise PodnetError(f"external DNS server (dnsmasq) exited; log {entry['log']}:\n{log_tail(entry['log'])}")
        if time.monotonic() > deadline:
            raise PodnetError(f"external DNS server did not bind {ip}:53 within {timeout:g}s")
        time.sleep(0.05)
    for n in st.data["nodes"]:
        topology.write_netns_file(n["netns"], "resolv.conf", f"nameserver {ip}\n")
    say(f"external DNS: zone {spec.external.dns.zone} on {ip}:53 (pid {entry['pid']})")


def _udp_bound(entry: dict, ip: str, port: int) -> bool:
    """Whether the process's namespace has a UDP socket bound to ip:port (from /proc, no tools)."""
    local = f"{int.from_bytes(ipaddress.IPv4Address(ip).packed, 'little'):08X}:{port:04X}"
    try:
        with open(f"/proc/{entry['pid']}/net/udp") as f:
            return any(line.split()[1] == local for line in list(f)[1:])
    except (OSError, IndexError):
        return False


def _wait_servers(st: LabState, entries: list[dict], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(entries)
    ext = st.process("external")
    if ext is not None:
        pending.append(ext)
    while pending:
        for e in list(pending):
            if os.path.exists(e["ready"]):
                pending.remove(e)
            elif st.process_pid(e) is None:
                raise PodnetError(f"server {e['server']} exited; log {e['log']}:\n{log_tail(e['log'])}")
        if pending and time.monotonic() > deadline:
            raise PodnetError(f"servers not ready within {timeout:g}s: {', '.join(e['server'] for e in pending)}")
        if pending:
            time.sleep(0.05)


# ====================================================================== down


def down(st: LabState, *, say: Say = _quiet) -> None:
    """Remove everything the state records: pods (CNI DEL), processes, namespaces, objects, the directory."""
    with _locked(st):
        data = st.data
        nodes = {n["name"]: n for n in data.get("nodes", [])}
        # CNI DEL while the agents still run, newest pod first.
        for entry in reversed(data.get("pods", [])):
            node = nodes.get(entry["node"])
            if not entry.get("attempted") or node is None or not os.path.exists(node.get("conflist", "")):
                continue
            if data.get("cni") == "podnet":
                agent = st.process(f"agent-{node['name']}")
                if agent is None or st.process_pid(agent) is None:
                    continue
            try:
                node_runtime(st, node, timeout=15.0).delete(pod_runtime_conf(entry))
            except (CNIError, OSError) as e:
                say(f"pod {entry['namespace']}/{entry['name']}: CNI DEL failed ({e}); removing its namespace anyway")
        # Processes: servers and controllers first, then agents, then the store relay they talk
        # through, then the API server (kube-sync and the endpoint controller are gone by then).
        procs = sorted(data.get("processes", []),
                       key=lambda p: {"agent": 1, "node-dns": 1, "relay": 2, "apiserver": 3}.get(p.get("role"), 0))
        for p in procs:
            if st.stop_process(p):
                say(f"stopped {p['key']} (pid {p.get('pid')})")
        # The BIRDs the agents started (an agent leaves its BIRD running when it stops).
        for node in lab_bgp.stop_node_birds(st):
            say(f"stopped BIRD of node {node}")
        # Namespaces, newest first: pods, nodes, underlay (their links go with them).
        for ns in reversed(data.get("netns", [])):
            if topology.delete_netns(ns):
                say(f"deleted netns {ns}")
        # Objects in a store that outlives the lab.
        if data.get("store") and not data.get("store_owned", True):
            _delete_objects(st, data["store"], data.get("objects", []), say)
        shutil.rmtree(st.dir, ignore_errors=True)


@contextlib.contextmanager
def _locked(st: LabState):
    st.lock()
    try:
        yield
    finally:
        st.unlock()


def _delete_objects(st: LabState, url: str, refs: list[list], say: Say) -> None:
    try:
        store = ObjectStore(open_lab_store(st, url, create=True))
        objs = []
        for kind, name, namespace in refs:
            cls = KINDS.get(kind)
            obj = store.get(cls, name, namespace) if cls else None
            if obj is not None:
                objs.append(obj)
            if cls is Service:  # and the slices the lab's endpoint controller made for it
                objs += store.list(EndpointSlice, namespace, _slices_of(name))
        store.delete_all(objs)
        for o in objs:
            if isinstance(o, Service):
                release_service(store, o)
        say(f"deleted {len(objs)} objects from {url}")
    except Exception as e:  # the store may be gone; the lab's own resources are what matter here
        say(f"could not delete the lab's objects from {url}: {e}")


def down_by_name(name: str | None, root: Path | None = None, say: Say = _quiet) -> list[str]:
    """`lab down`: one lab, or the only one; nothing to clean is a success. Returns the labs removed."""
    if name is None:
        labs = all_labs(root)
        if not labs:
            return []
        if len(labs) > 1:
            raise PodnetError(f"several labs are up ({', '.join(labs)}): choose one with --name")
        name = labs[0]
    st = LabState.open(name, root)
    if st is None:
        return []
    down(st, say=say)
    return [name]


# ====================================================================== status / exec


def status(st: LabState) -> dict[str, Any]:
    data = st.data
    nodes = []
    for n in data.get("nodes", []):
        agent = st.process(f"agent-{n['name']}")
        if data.get("cni") != "podnet":
            state = "none (reference bridge)"
        elif agent is None:
            state = "not started"
        else:
            pid = st.process_pid(agent)
            state = f"running (pid {pid})" if pid else "dead"
        nodes.append({"name": n["name"], "address": n["address"], "netns": n["netns"], "agent": state,
                      "dns": _node_dns_state(st, n["name"]), "log": n.get("log"), "podCIDR": n.get("podCIDR")})
    pods = []
    for j, p in enumerate(data.get("pods", [])):
        server = st.process(f"pod-{p.get('index', j)}")
        pods.append({"namespace": p["namespace"], "name": p["name"], "node": p["node"], "ips": p.get("ips", []),
                     **({"networks": p["networks"]} if p.get("networks") else {}),
                     "netns": p["netns"], "ready": p.get("added", False),
                     "server": ("running" if st.process_pid(server) else "dead") if server else "none"})
    ext = st.process("external")
    dns = st.process("external-dns")
    ctl = st.process(ENDPOINT_CONTROLLER)
    api = st.process("kube-apiserver")
    sync = st.process("kube-sync")
    kube = {"apiServer": f"{data['kube']['url']} ({_running(st, api)}), kubeconfig {data['kube']['kubeconfig']}",
            "kubeSync": _running(st, sync)} if data.get("kube") else {}
    return {"name": st.name, "id": data.get("id"), "phase": st.phase, "dir": str(st.dir),
            "store": data.get("store"), "underlay": data.get("underlay"),
            "underlayNetns": data.get("underlay_netns"), "external": data.get("external"),
            "externalServer": ("running" if st.process_pid(ext) else "dead") if ext else None,
            "externalDns": ("running" if st.process_pid(dns) else "dead") if dns else None,
            "endpointController": (f"running (pid {st.process_pid(ctl)})" if st.process_pid(ctl) else "dead")
            if ctl else None,
            "error": data.get("error"), "source": data.get("source", "store"), **kube, "nodes": nodes, "pods": pods}


def _running(st: LabState, entry: dict | None) -> str:
    pid = st.process_pid(entry) if entry else None
    return f"running (pid {pid})" if pid else "dead"


def _node_dns_state(st: LabState, node: str) -> str:
    """The node DNS process's state; "agent" when the agent answers itself (`dnsServer: inprocess`)."""
    if st.data.get("cni") != "podnet":
        return "none"
    entry = st.process(node_dns_key(node))
    if entry is None:
        return "agent" if st.data.get("dns_server") == "inprocess" else "not started"
    pid = st.process_pid(entry)
    return f"running (pid {pid})" if pid else "dead"


def find_pod(st: LabState, ref: str) -> dict:
    ns, _, name = ref.rpartition("/")
    matches = [p for p in st.data.get("pods", []) if p["name"] == name and (not ns or p["namespace"] == ns)]
    if not matches:
        raise PodnetError(f"lab {st.name} has no pod {ref!r}")
    if len(matches) > 1:
        raise PodnetError(f"pod name {name!r} is in several namespaces "
                          f"({', '.join(p['namespace'] for p in matches)}): write NAMESPACE/{name}")
    return matches[0]


def find_node(st: LabState, name: str) -> dict:
    for n in st.data.get("nodes", []):
        if n["name"] == name:
            return n
    raise PodnetError(f"lab {st.name} has no node {name!r}")


def exec_argv(netns: str, argv: list[str]) -> list[str]:
    if not argv:
        raise PodnetError("no command given: podnet lab exec POD -- CMD...")
    if not topology.netns_exists(netns):
        raise PodnetError(f"network namespace {netns} does not exist (is the lab up?)")
    return ["ip", "netns", "exec", netns, *argv]
