"""How full each pool is, and which node holds which block: what `podnet ipam show` prints."""

from __future__ import annotations

from podnet.ipam import block as blk
from podnet.ipam import keys
from podnet.ipam.selection import SnapshotReader
from podnet.store.base import KeyValueStore


def usage(kv: KeyValueStore) -> dict:
    """{"pools": [...], "blocks": [...]} with per-pool totals and every block's owner and use."""
    snap = SnapshotReader(kv).read()
    records, _ = kv.list(keys.BLOCKS)
    values = sorted((r.value for r in records), key=lambda v: blk.network(v["cidr"]))
    pools = []
    for pool in snap.pools:
        assert pool.spec.block_size is not None
        mine = [v for v in values if (p := snap.pool_of_block(v)) is not None and p.name == pool.name]
        used = sum(blk.used(v) for v in mine)
        total = blk.network(pool.spec.cidr).num_addresses
        pools.append({
            "name": pool.name,
            "cidr": pool.spec.cidr,
            "blockSize": pool.spec.block_size,
            "disabled": pool.spec.disabled,
            "blocks": len(mine),
            "blockCapacity": blk.block_count(pool.spec.cidr, pool.spec.block_size),
            "used": used,
            "total": total,
            "utilisation": round(100.0 * used / total, 2) if total else 0.0,
        })
    blocks = [{
        "cidr": v["cidr"],
        "pool": v.get("pool"),
        "node": blk.affinity_node(v),
        "used": blk.used(v),
        "size": blk.size(v),
    } for v in values]
    return {"pools": pools, "blocks": blocks}
