"""The CNI plugin (spec 1.1): a thin executable that hands each request to the node agent over
a unix socket (native/cni/podnet-cni.c, a static C program), and the agent side that serves it:

    server.py       the agent's socket: one request per connection
    handler.py      CNIHandler: parses a request, runs its command, orders concurrent ones
    commands.py     ADD, DEL, CHECK, STATUS, GC and VERSION
    spec.py         the CNI spec: versions, error codes, request checks, result documents
    sessions.py     store connections per request; store faults answered as code 11
    attachments.py  attachment handles and where their records live in the store
    netns.py        the check that CNI_NETNS is a pod's network namespace
    serve.py        a CNI server alone, without the agent (for measuring the CNI path)
    install.py      builds the plugin executable and installs it into a CNI bin directory
"""

DEFAULT_SOCKET = "/run/podnet/cni.sock"  # where the agent serves, and the plugin asks, unless told otherwise
