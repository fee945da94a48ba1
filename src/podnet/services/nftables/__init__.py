"""podnet's nftables Service dataplane (table `ip podnet-svc`), one concern per module:

    layout     the table's definition: sets, maps, the fixed chains and the tier tree,
               the Layout (tree depth, capacity, marker), and its structure as `nft -f` text
    elements   what each frontend owns in which set or map (`rule_items`), a state's
               elements as text, deltas between states, stale UDP flows
    encoding   elements in the kernel's binary layout (netlink batches) and the digest
    kernel     reading the table back with netlink dumps, and checking it is our layout

The names used elsewhere are importable from here (`from podnet.services import nftables
as nt; nt.elements(state)`).
"""

from podnet.services.nftables.elements import (
    Item,
    changed_rules,
    delta_transaction,
    describe_delta,
    diff,
    elements,
    fe_key,
    frontend_of,
    is_large,
    item_text,
    large_slot_changes,
    rule_elements,
    rule_items,
    stale_udp_flows,
    state_delta,
)
from podnet.services.nftables.encoding import (
    digest_delta,
    digest_element,
    element_batch,
    encode_element,
    encode_item,
    item_of,
    large_chain_expressions,
    rule_hash,
    rule_share,
    state_batch,
    state_digest,
)
from podnet.services.nftables.kernel import (
    KernelTable,
    affinity_delete_batch,
    check_layout,
    decode_element,
    decode_intervals,
    kernel_layout,
    read_affinity,
    read_slot_orders,
    read_table,
)
from podnet.services.nftables.layout import (
    ADDRESS_SETS,
    AFFINITY_MAP,
    AFFINITY_MAX,
    DIGEST,
    DYNAMIC,
    FAMILY,
    KEY_MAPS,
    LARGE_MAPS,
    LARGE_SLOT_MAPS,
    LOCAL_NODEPORT,
    MIN_CAPACITY,
    NOT_ELEMENTS,
    POD_INTERFACES,
    PROTOS,
    SETS,
    SHORT_CIRCUIT_SOURCES,
    SIZED,
    SLOT_MAPS,
    SLOT_TYPEOF,
    SVC_TABLE,
    TABLE,
    TEXT_ONLY,
    TIER_BITS,
    TIER_MAX,
    VERDICT_MAPS,
    Elements,
    Layout,
    affinity_chain,
    affinity_chain_rules,
    affinity_chain_script,
    dynamic_chain_rules,
    element_chains,
    is_affinity_chain,
    is_dynamic_chain,
    large_chain,
    large_chain_of,
    large_chain_refs,
    large_chain_rule,
    remove_script,
    set_object,
    slot_map,
    slot_map_object,
    slot_map_of,
    state_chains,
    state_sizes,
    structure_script,
    structure_transaction,
)

__all__ = [
    "ADDRESS_SETS", "AFFINITY_MAP", "AFFINITY_MAX", "DIGEST", "DYNAMIC", "FAMILY", "KEY_MAPS", "LARGE_MAPS",
    "LARGE_SLOT_MAPS", "LOCAL_NODEPORT", "MIN_CAPACITY", "NOT_ELEMENTS", "POD_INTERFACES", "PROTOS", "SETS",
    "SHORT_CIRCUIT_SOURCES", "SIZED", "SLOT_MAPS", "SLOT_TYPEOF", "SVC_TABLE", "TABLE", "TEXT_ONLY", "TIER_BITS",
    "TIER_MAX", "VERDICT_MAPS", "Elements", "Item", "KernelTable", "Layout", "affinity_chain", "affinity_chain_rules",
    "affinity_chain_script", "affinity_delete_batch", "changed_rules", "check_layout", "decode_element",
    "decode_intervals", "delta_transaction", "describe_delta", "diff", "digest_delta", "digest_element",
    "dynamic_chain_rules", "element_batch", "element_chains", "elements", "encode_element", "encode_item", "fe_key",
    "frontend_of", "is_affinity_chain", "is_dynamic_chain", "is_large", "item_of", "item_text", "kernel_layout",
    "large_chain", "large_chain_expressions", "large_chain_of", "large_chain_refs", "large_chain_rule",
    "large_slot_changes", "read_affinity", "read_slot_orders", "read_table", "remove_script",
    "rule_elements", "rule_hash", "rule_items", "rule_share", "set_object", "slot_map", "slot_map_object",
    "slot_map_of", "stale_udp_flows", "state_batch", "state_chains", "state_delta", "state_digest", "state_sizes",
    "structure_script", "structure_transaction",
]
