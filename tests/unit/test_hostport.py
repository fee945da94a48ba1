"""The one HOST:PORT parser, and the places that use it."""

from __future__ import annotations

import argparse

import pytest

from podnet.errors import PodnetError
from podnet.hostport import parse_host_port


@pytest.mark.parametrize("text, default, want", [
    ("[::1]:53", None, ("::1", 53)),
    ("[::1]:53", 5353, ("::1", 53)),
    ("[::1]", 53, ("::1", 53)),
    ("10.0.0.1:53", None, ("10.0.0.1", 53)),
    ("10.0.0.1:53", 5353, ("10.0.0.1", 53)),
    ("10.0.0.1", 53, ("10.0.0.1", 53)),
    ("name:53", None, ("name", 53)),
    ("name", 53, ("name", 53)),
    ("fd00::1", 53, ("fd00::1", 53)),
    ("fd00::1:2379", None, ("fd00::1", 2379)),
    ("[fd00::1]:0", None, ("fd00::1", 0)),
    ("127.0.0.1:65535", None, ("127.0.0.1", 65535)),
])
def test_parses(text, default, want):
    assert parse_host_port(text, default) == want


@pytest.mark.parametrize("text, default, why", [
    ("10.0.0.1", None, "no port"),
    ("[::1]", None, "no port"),
    ("name", None, "no port"),
    ("[::1", 53, "no closing ']'"),
    ("[::1]53", 53, "unexpected '53' after ']'"),
    ("[::1]:", 53, "no port after ':'"),
    ("10.0.0.1:", 53, "no port after ':'"),
    ("[]:53", 53, "no host"),
    (":53", 53, "no host"),
    ("", 53, "no host"),
    ("10.0.0.1:dns", 53, "port 'dns' is not a number from 0 to 65535"),
    ("10.0.0.1:-1", None, "port '-1' is not a number"),
    ("10.0.0.1:65536", 53, "port '65536' is not a number"),
    ("10.0.0.1:٥٣", 53, "is not a number"),
])
def test_bad_input_says_what_is_wrong_and_what_is_expected(text, default, why):
    with pytest.raises(ValueError) as e:
        parse_host_port(text, default)
    msg = str(e.value)
    assert msg.startswith(repr(text)) and why in msg
    assert ("expected HOST:PORT or [IPV6]:PORT" if default is None else "expected HOST[:PORT] or [IPV6][:PORT]") in msg


def test_agent_dns_upstream_takes_ipv6_in_brackets():
    from podnet.cli.agent import _dns_upstream

    assert _dns_upstream("[::1]:5353") == ("::1", 5353)
    assert _dns_upstream("10.0.0.1") == ("10.0.0.1", 53)
    with pytest.raises(PodnetError, match=r"--dns-upstream '10.0.0.1:x': port 'x'"):
        _dns_upstream("10.0.0.1:x")


def test_etcd_endpoints():
    from podnet.store.etcd import parse_endpoint

    assert parse_endpoint("http://[::1]:2379/") == ("::1", 2379)
    assert parse_endpoint(" 127.0.0.1:2379") == ("127.0.0.1", 2379)
    with pytest.raises(PodnetError, match="etcd endpoint '127.0.0.1': no port"):
        parse_endpoint("127.0.0.1")


def test_lab_forward_and_probe_arguments():
    from podnet.lab.forward import parse_map
    from podnet.lab.probe import parse_target

    assert parse_map("10.0.0.1:23790=[::1]:2379") == (("10.0.0.1", 23790), ("::1", 2379))
    assert parse_target("tcp:[fd00::5]:80") == ("tcp", "fd00::5", 80)
    assert parse_target("udp:10.0.0.5:53") == ("udp", "10.0.0.5", 53)
    with pytest.raises(argparse.ArgumentTypeError, match="no port"):
        parse_map("10.0.0.1=10.0.0.2:1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected PROTO:HOST:PORT"):
        parse_target("icmp:10.0.0.5:1")
