"""The resolv.conf rendered for pods."""

from __future__ import annotations

import pytest

from podnet.dns.resolvconf import host_search_domains, render, search_path


def test_pod_resolv_conf():
    text = render("team", "169.254.20.10", host_search=["corp.example", "example.net."])
    assert text == (
        "nameserver 169.254.20.10\n"
        "search team.svc.cluster.local svc.cluster.local cluster.local corp.example example.net\n"
        "options ndots:5\n"
    )


def test_zone_options_and_several_servers():
    text = render("a", ["10.0.0.10", "fd00::a"], zone="corp.k8s.", ndots=2, options=["edns0", "timeout:2"])
    assert text.splitlines() == ["nameserver 10.0.0.10", "nameserver fd00::a",
                                 "search a.svc.corp.k8s svc.corp.k8s corp.k8s", "options ndots:2 edns0 timeout:2"]


def test_search_path_has_no_duplicates():
    assert search_path("x", host_search=["cluster.local", "svc.cluster.local", "lan"]) == [
        "x.svc.cluster.local", "svc.cluster.local", "cluster.local", "lan"]


def test_limits_and_validation():
    many = [f"d{i}.example" for i in range(60)]
    text = render("ns", "10.0.0.10", host_search=many)
    search = text.splitlines()[1].split()[1:]
    assert len(search) == 32
    with pytest.raises(ValueError):
        render("ns", "not-an-ip")
    with pytest.raises(ValueError):
        render("ns", "10.0.0.10", host_search=["bad domain"])
    with pytest.raises(ValueError, match="is not a valid domain name"):  # would end the search line early
        render("ns", "10.0.0.10", zone="cluster.local\n")
    with pytest.raises(ValueError):
        render("ns", [])


def test_host_search_domains(tmp_path):
    f = tmp_path / "resolv.conf"
    f.write_text("domain old.example\nnameserver 1.1.1.1\nsearch corp.example. lan\n")
    assert host_search_domains(str(f)) == ["corp.example", "lan"]
    assert host_search_domains(str(tmp_path / "missing")) == []
