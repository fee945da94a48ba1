"""The `k8s.v1.cni.cncf.io/network-status` annotation: one entry per pod interface, as
network-attachment-definition-client's CreateNetworkStatuses builds them:

    [{"name": "podnet", "interface": "eth0", "ips": ["10.244.0.5"], "mac": "..", "default": true,
      "dns": {}},
     {"name": "default/underlay", "interface": "net1", "ips": ["10.99.0.70"], "mac": "..", "dns": {}}]

The cluster network is named by its CNI network name and is the default; each additional
network by <namespace>/<name>. A result with several pod interfaces gives one entry each
(addresses by their interface index; one without an index goes to the last). Written back
to the Pod object in the store with a compare-and-swap on its revision; a Pod deleted
meanwhile is no error (Multus tolerates it too).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from podnet.model.objects import Pod
from podnet.multinet import ANNOTATION_STATUS
from podnet.multinet.results import is_default, normalize
from podnet.store.base import Conflict, KeyValueStore, NotFound
from podnet.store.objects import ObjectStore

log = logging.getLogger("podnet.multinet")
RETRIES = 10


def _ip(address: str) -> str:
    return address.split("/", 1)[0]


def _dns(dns: Any) -> dict[str, Any]:
    if not isinstance(dns, dict):
        return {}
    return {k: dns[k] for k in ("nameservers", "domain", "search", "options") if dns.get(k)}


def statuses(result: dict[str, Any], name: str, default: bool, ifname: str) -> list[dict[str, Any]]:
    """The entries of one network's result."""
    res = normalize(result)
    gateways = [r["gw"] for r in res["routes"] if is_default(r) and r.get("gw")]
    dns = _dns(res["dns"])
    pod_ifaces = [(i, it) for i, it in enumerate(res["interfaces"]) if it.get("sandbox")]
    if len(pod_ifaces) <= 1:
        iface = pod_ifaces[0][1] if pod_ifaces else {"name": ifname}
        entry: dict[str, Any] = {"name": name, "interface": iface.get("name") or ifname,
                                 "ips": [_ip(ip["address"]) for ip in res["ips"]]}
        if iface.get("mac"):
            entry["mac"] = iface["mac"]
        if iface.get("mtu"):
            entry["mtu"] = iface["mtu"]
        if default:
            entry["default"] = True
        if gateways:
            entry["gateway"] = gateways
        entry["dns"] = dns
        return [entry]
    out = []
    index = {}
    for n, (i, iface) in enumerate(pod_ifaces):
        index[i] = n
        entry = {"name": name, "interface": iface.get("name"), "ips": [], "mac": iface.get("mac") or ""}
        if default and n == 0:
            entry["default"] = True
        if gateways:
            entry["gateway"] = gateways
        entry["dns"] = dns
        out.append(entry)
    for ip in res["ips"]:
        target = index.get(ip.get("interface"), len(out) - 1) if isinstance(ip.get("interface"), int) \
            else len(out) - 1
        out[target]["ips"].append(_ip(ip["address"]))
    return out


def network_status(primary_name: str, primary_ifname: str, primary_result: dict[str, Any],
                   networks: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every entry of a pod: the cluster network, then each (network, ifname, result)."""
    out = statuses(primary_result, primary_name, True, primary_ifname)
    for network, ifname, result in networks:
        out += statuses(result, network, False, ifname)
    return out


def read_status(pod: Pod) -> list[dict[str, Any]]:
    """The entries of a Pod's annotation ([] when it has none or it is not a list of objects)."""
    try:
        entries = json.loads(pod.metadata.annotations.get(ANNOTATION_STATUS) or "[]")
    except ValueError:
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def write_status(kv: KeyValueStore, namespace: str, name: str, uid: str | None,
                 entries: list[dict[str, Any]]) -> bool:
    """Set the annotation on the Pod; False if the Pod (with that uid) is gone. Store
    failures other than a lost compare-and-swap are raised."""
    objects = ObjectStore(kv)
    text = json.dumps(entries, indent=None, separators=(", ", ": "))
    for _ in range(RETRIES):
        pod = objects.get(Pod, name, namespace)
        if pod is None or (uid and pod.metadata.uid and pod.metadata.uid != uid):
            log.info("network-status of pod %s/%s not written: the pod is gone", namespace, name)
            return False
        if pod.metadata.annotations.get(ANNOTATION_STATUS) == text:
            return True
        annotations = {**pod.metadata.annotations, ANNOTATION_STATUS: text}
        try:
            objects.update(pod.with_meta(annotations=annotations))
            return True
        except Conflict:
            continue
        except NotFound:
            return False
    raise Conflict(f"writing the network-status of pod {namespace}/{name}: it kept changing")
