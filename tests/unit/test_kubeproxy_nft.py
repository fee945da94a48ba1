"""The benchmark's kube-proxy nftables layout (tests/support/kubeproxy_nft.py): its full
and partial syncs as the ruleset they leave, in the fake of the typed nftables layer
(which refuses what the kernel refuses: a chain deleted while an element still jumps to it)."""

from __future__ import annotations

from tests.support import kubeproxy_nft as kp
from tests.support.nftables import FakeNft

from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState


def rule(service, ip, port, *backends, **kw) -> FrontendRule:
    return FrontendRule(Frontend(ip, "tcp", port), service, "ClusterIP", tuple(Backend(b, 8080) for b in backends), **kw)


WEB = rule("default/web:http", "10.96.0.10", 80, "10.1.0.1", "10.1.0.2")
API = rule("default/api:http", "10.96.0.11", 443, "10.1.0.3")
EMPTY = rule("default/gone:http", "10.96.0.12", 80)


def chains_of(fake: FakeNft, service: str) -> dict[str, list[str]]:
    rs = fake.ruleset(kp.TABLE)
    return {name: c.rules for name, c in rs.chains.items() if name.endswith(service.replace(":", "/"))
            or f"-{service.replace(':', '/')}__" in name}


def test_a_full_sync_gives_each_service_port_a_chain_and_each_endpoint_one():
    fake = FakeNft()
    fake.apply(kp.full_transaction(ServiceState(rules=(WEB, EMPTY))))
    web = chains_of(fake, WEB.service)
    svc = [n for n in web if n.startswith("service-")]
    eps = [next(n for n in web if n.endswith(f"__{b}/8080")) for b in ("10.1.0.1", "10.1.0.2")]
    assert len(svc) == 1 and len(web) == 3 and svc[0].endswith("-default/web/http")
    assert web[svc[0]] == [f"numgen random mod 2 vmap {{ 0 : goto {eps[0]}, 1 : goto {eps[1]} }}"]
    assert "meta l4proto tcp dnat to 10.1.0.1:8080" in sum(web.values(), [])
    maps = fake.ruleset(kp.TABLE).sets
    assert maps["service-ips"].elements == {f"10.96.0.10 . tcp . 80 : goto {svc[0]}"}
    assert maps["no-endpoint-services"].elements == {"10.96.0.12 . tcp . 80 : goto reject-chain"}
    assert fake.ruleset(kp.TABLE).chains["filter-input"].spec.startswith("type filter hook input priority -110;")


def test_a_partial_sync_rewrites_only_the_service_ports_that_changed():
    fake = FakeNft()
    before = ServiceState(rules=(WEB, API))
    fake.apply(kp.full_transaction(before))
    api_chains = chains_of(fake, API.service)
    moved = rule("default/web:http", "10.96.0.10", 80, "10.1.0.1", "10.1.0.9")
    tx, changed = kp.partial_transaction(kp.units(before), kp.units(ServiceState(rules=(moved,))))
    fake.apply(tx)
    assert changed == 2  # web's endpoints changed, api went
    assert chains_of(fake, API.service) == {} and api_chains
    web = chains_of(fake, WEB.service)
    assert len(web) == 3 and any("10.1.0.9" in n for n in web) and not any("10.1.0.2" in n for n in web)
    svc = next(n for n in web if n.startswith("service-"))
    assert fake.ruleset(kp.TABLE).sets["service-ips"].elements == {f"10.96.0.10 . tcp . 80 : goto {svc}"}

