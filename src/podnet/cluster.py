"""The cluster's configuration: settings every part must agree on, kept once in the store.

    /podnet/cluster/config   {"serviceCIDR": "10.96.0.0/12", "clusterDomain": "cluster.local"}

Written once, by the first `podnet apply` on a store (from --service-cidr, or the
default) or by `podnet lab up` (from the lab's spec.serviceCIDR), and read by every
later apply (where Services get their ClusterIPs), by the agents (which Service
addresses they program) and by the lab. An apply asking for another Service CIDR is
refused, naming both; an agent's --service-cidr overrides it on that node with a
warning. A store without the key behaves as one holding the defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from podnet.errors import PodnetError
from podnet.model.names import is_dns1123_subdomain
from podnet.store.base import AlreadyExists, KeyValueStore, Op

CLUSTER_CONFIG_KEY = "/podnet/cluster/config"
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"  # the Kubernetes default
DEFAULT_CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class ClusterConfig:
    service_cidr: str = DEFAULT_SERVICE_CIDR
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN

    def to_json(self) -> dict[str, str]:
        return {"serviceCIDR": self.service_cidr, "clusterDomain": self.cluster_domain}


def service_network(cidr: str, what: str) -> str:
    """cidr as a network (host bits clear), or an error naming where it came from."""
    try:
        return str(ipaddress.ip_network(cidr, strict=True))
    except ValueError as e:
        raise PodnetError(f"{what} {cidr!r} is not a valid CIDR ({e})") from None


def _decode(value: object) -> ClusterConfig:
    where = f"store key {CLUSTER_CONFIG_KEY}"
    if not isinstance(value, dict):
        raise PodnetError(f"{where}: expected an object with serviceCIDR and clusterDomain")
    cidr, domain = value.get("serviceCIDR"), value.get("clusterDomain", DEFAULT_CLUSTER_DOMAIN)
    if not isinstance(cidr, str):
        raise PodnetError(f"{where}: field serviceCIDR is missing or not a string")
    if not isinstance(domain, str) or not is_dns1123_subdomain(domain):
        raise PodnetError(f"{where}: field clusterDomain {domain!r} is not a domain name "
                          "(lowercase DNS labels joined by dots, as cluster.local)")
    return ClusterConfig(service_network(cidr, f"{where}: field serviceCIDR"), domain)


def read_cluster_config(kv: KeyValueStore) -> ClusterConfig | None:
    """The stored configuration, or None if the store has none yet."""
    rec = kv.get(CLUSTER_CONFIG_KEY)
    return None if rec is None else _decode(rec.value)


def cluster_config(kv: KeyValueStore) -> ClusterConfig:
    """The stored configuration, or the defaults."""
    return read_cluster_config(kv) or ClusterConfig()


def planned_cluster_config(kv: KeyValueStore, *, service_cidr: str | None = None,
                           origin: str = "--service-cidr") -> tuple[ClusterConfig, bool]:
    """The cluster's configuration and whether it is still to be written (the store has none:
    then it is service_cidr's, or the default). A service_cidr other than the stored one is an
    error naming both."""
    wanted = service_network(service_cidr, origin) if service_cidr is not None else None
    stored = read_cluster_config(kv)
    if stored is None:
        return ClusterConfig(service_cidr=wanted or DEFAULT_SERVICE_CIDR), True
    _check(stored, wanted, origin)
    return stored, False


def ensure_cluster_config(kv: KeyValueStore, *, service_cidr: str | None = None,
                          origin: str = "--service-cidr") -> ClusterConfig:
    """The cluster's configuration, written now if the store has none (see planned_cluster_config)."""
    config, new = planned_cluster_config(kv, service_cidr=service_cidr, origin=origin)
    if not new:
        return config
    try:
        kv.txn([Op.create(CLUSTER_CONFIG_KEY, config.to_json())])
        return config
    except AlreadyExists:  # another writer was first: theirs holds
        stored = read_cluster_config(kv)
        assert stored is not None
        _check(stored, service_network(service_cidr, origin) if service_cidr is not None else None, origin)
        return stored


def _check(stored: ClusterConfig, wanted: str | None, origin: str) -> None:
    if wanted is not None and wanted != stored.service_cidr:
        raise PodnetError(
            f"{origin} {wanted} differs from the cluster's Service CIDR {stored.service_cidr} (store key "
            f"{CLUSTER_CONFIG_KEY}, field serviceCIDR, set once when the store was first used): "
            "leave it out to use the cluster's")


def agent_settings(kv: KeyValueStore, service_cidrs: list[str] | None, cluster_domain: str | None,
                   warn: Callable[[str], None]) -> tuple[tuple[str, ...], str]:
    """The Service CIDRs and cluster domain an agent uses: the cluster's, unless its own flags
    override them on this node (a warning says so, when they differ)."""
    config = cluster_config(kv)
    cidrs = tuple(service_network(c, "--service-cidr") for c in service_cidrs or ())
    if cidrs and cidrs != (config.service_cidr,):
        warn(f"--service-cidr {', '.join(cidrs)} overrides the cluster's Service CIDR {config.service_cidr} "
             f"(store key {CLUSTER_CONFIG_KEY}): Services applied with the cluster's are not served here")
    if cluster_domain is not None and not is_dns1123_subdomain(cluster_domain):
        # it becomes every pod's resolv.conf search path and the zone the node answers
        raise PodnetError(f"--cluster-domain {cluster_domain!r} is not a domain name "
                          "(lowercase DNS labels joined by dots, as cluster.local)")
    if cluster_domain and cluster_domain != config.cluster_domain:
        warn(f"--cluster-domain {cluster_domain} overrides the cluster's domain {config.cluster_domain} "
             f"(store key {CLUSTER_CONFIG_KEY})")
    return cidrs or (config.service_cidr,), cluster_domain or config.cluster_domain
