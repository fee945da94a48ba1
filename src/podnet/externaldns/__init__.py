"""Publishing Services to an external DNS server, as ExternalDNS does, through RFC 2136.

    source.py     Services (with their EndpointSlices and the Nodes) -> desired records,
                  from the external-dns.kubernetes.io annotations; the follower feeds it
    endpoint.py   a desired record, DNS name and TTL syntax
    registry.py   the TXT registry: ownership records in ExternalDNS's format, and the
                  zone as read (records and who owns each name)
    plan.py       desired records x the zone -> changes per name, conflicts, policies
    rfc2136.py    the provider: TSIG-signed AXFR to read a zone, TSIG-signed UPDATEs
                  whose prerequisites make every change conditional on ownership
    controller.py the loop: sync on change and every --interval, retries, status

Every change to a name is one UPDATE section guarded by prerequisites (this owner's
TXT record exactly as read, or the name's absence for a create), so a change never
lands on a name another owner or a person took after the zone was read; many changes
travel in one message, and a message refused on a prerequisite is split until the
changes that lost their race are found (see rfc2136.py).
"""
