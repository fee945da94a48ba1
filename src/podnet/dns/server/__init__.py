"""The node's DNS server: cluster names from the index, the rest forwarded and cached.

- ``fastpath``: ``DNSServer``, its UDP and TCP sockets and the UDP fast path
  (answers spliced from the index's rendered-response table or the upstream cache);
- ``slowpath``: parsing the rest, rendering answers from the index, forwarding
  upstream, chasing CNAMEs;
- ``autopath``: server-side search for local pods (as CoreDNS);
- ``query`` and ``entries``: the query parser and the rendered-answer entries
  both paths share;
- ``cli``: ``python -m podnet.dns.server``;
- ``node``: ``podnet dns serve``, the node's server as a process of its own beside the
  agent (follows the store itself, keeps answering while the agent is down).
"""

from podnet.dns.server.cli import main
from podnet.dns.server.fastpath import DNSServer
from podnet.dns.server.query import Query, fast_safe, parse_query
from podnet.dns.server.slowpath import Result

__all__ = ["DNSServer", "Query", "Result", "fast_safe", "main", "parse_query"]
