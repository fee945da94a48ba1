"""HOST:PORT as users and other processes write it, IPv6 addresses in brackets.

    parse_host_port("10.0.0.1:53")        -> ("10.0.0.1", 53)
    parse_host_port("[::1]:53")           -> ("::1", 53)
    parse_host_port("name:53")            -> ("name", 53)
    parse_host_port("10.0.0.1", 53)       -> ("10.0.0.1", 53)   the port may be left out
    parse_host_port("[::1]", 53)          -> ("::1", 53)        when there is a default
    parse_host_port("fd00::1", 53)        -> ("fd00::1", 53)    a bare IPv6 address is a host

Without a default the port is required, and the last colon of an address without
brackets separates it ("fd00::1:53" -> ("fd00::1", 53)). Anything else is a
ValueError whose message names the text and what was expected.
"""

from __future__ import annotations


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) from HOST:PORT or [IPV6]:PORT; the port is optional when default_port is given."""
    expected = "HOST:PORT or [IPV6]:PORT" if default_port is None else "HOST[:PORT] or [IPV6][:PORT]"

    def bad(why: str) -> ValueError:
        return ValueError(f"{text!r}: {why}; expected {expected}")

    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise bad("no closing ']'")
        if rest and not rest.startswith(":"):
            raise bad(f"unexpected {rest!r} after ']'")
        port = rest[1:] if rest else None
        if rest and not port:
            raise bad("no port after ':'")
    elif text.count(":") == 1 or (default_port is None and ":" in text):
        host, _, port = text.rpartition(":")
        if not port:
            raise bad("no port after ':'")
    else:
        host, port = text, None
    if not host:
        raise bad("no host")
    if port is None:
        if default_port is None:
            raise bad("no port")
        return host, default_port
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise bad(f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)
