"""The hot-path address parser agrees with the standard library's ipaddress."""

import ipaddress

import pytest

from podnet.model.addresses import canonical_ip, ipv4_or_none, packed_ip

GOOD = ["10.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "fd00::1", "FD00:0:0::1", "::ffff:10.0.0.1"]
BAD = ["10.0.0", "10.0.0.256", "010.0.0.1", "10.0.0.1 ", "10.0.0.1\n", "", "x", "1.2.3.4.5", ":::", "10.0.0.1/32"]


@pytest.mark.parametrize("text", GOOD)
def test_good_addresses_as_ipaddress_reads_them(text):
    ip = ipaddress.ip_address(text)
    assert packed_ip(text) == ip.packed
    assert canonical_ip(text) == str(ip)
    assert ipv4_or_none(text) == (text if ip.version == 4 else None)


@pytest.mark.parametrize("text", BAD)
def test_bad_addresses_are_refused_as_ipaddress_refuses_them(text):
    with pytest.raises(ValueError):
        ipaddress.ip_address(text)
    with pytest.raises(ValueError, match="is not an IP address"):
        packed_ip(text)
    with pytest.raises(ValueError, match="is not an IP address"):
        canonical_ip(text)
    assert ipv4_or_none(text) is None
