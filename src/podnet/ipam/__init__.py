"""IP address management in Calico's model: pools carved into blocks, blocks affine to nodes,
addresses recorded per block under a handle. See allocator.py for the API."""

from podnet.ipam.allocator import IPAM, Allocation, BlockInfo, NodeRelease
from podnet.ipam.errors import (
    AddressUnavailable,
    IPAMError,
    IPAMExhausted,
    NoPool,
    TooManyConflicts,
    TryLater,
)
from podnet.ipam.selection import ANNOTATION_ADDRESS, ANNOTATION_POOLS

__all__ = [
    "ANNOTATION_ADDRESS", "ANNOTATION_POOLS", "AddressUnavailable", "Allocation", "BlockInfo", "IPAM",
    "IPAMError", "IPAMExhausted", "NoPool", "NodeRelease", "TooManyConflicts", "TryLater",
]
