"""Running nftables transactions: one `nft -f -` per change set, all or nothing."""

from __future__ import annotations

import subprocess

from podnet.errors import PodnetError


class NftError(PodnetError):
    pass


def nft_apply(script: str) -> None:
    """Apply a ruleset fragment atomically in the current network namespace."""
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NftError(f"nft rejected the ruleset: {proc.stderr.strip()}")

