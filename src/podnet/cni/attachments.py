"""What names a pod attachment and where its record lives in the store.

Each (network name, CNI_CONTAINERID, CNI_IFNAME) is one attachment, with the IPAM handle
`<network>.<containerID>.<ifname>`. ADD writes its record
/podnet-alloc/attachments/<node>/<handle> before it allocates, so GC and DEL can always find
what an interrupted ADD left; DEL and GC release the address before they delete the record.
"""

from __future__ import annotations

from podnet.store.layout import ALLOC

ATTACHMENTS_PREFIX = ALLOC + "attachments/"  # per node; no other node's agent reads them


def attachment_handle(network: str, container_id: str, ifname: str) -> str:
    return f"{network}.{container_id}.{ifname}"


def node_attachments_prefix(node: str) -> str:
    return f"{ATTACHMENTS_PREFIX}{node}/"


def attachment_key(node: str, handle: str) -> str:
    return f"{ATTACHMENTS_PREFIX}{node}/{handle}"
