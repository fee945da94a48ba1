"""Running nftables transactions: one `nft -f -` per change set, all or nothing."""

from __future__ import annotations

import json
import shutil
import subprocess

from podnet.errors import PodnetError


class NftError(PodnetError):
    pass


def dies_with_parent(argv: list[str]) -> list[str]:
    """argv run so that the kernel kills it when the thread that started it goes (the agent
    killed with -9, or stopped): an `nft` loading a large table must not outlive the agent
    and hold the namespace's teardown (setpriv execs the command: same process)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv] if shutil.which("setpriv") else argv


def nft_apply(script: str) -> None:
    """Apply a ruleset fragment atomically in the current network namespace."""
    proc = subprocess.run(dies_with_parent(["nft", "-f", "-"]), input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NftError(f"nft rejected the ruleset: {proc.stderr.strip()}")



def nft_json(*args: str) -> list[dict]:
    """`nft -j ARGS`'s items (for small listings: `list tables`, one small table)."""
    proc = subprocess.run(dies_with_parent(["nft", "-j", *args]), capture_output=True, text=True)
    if proc.returncode != 0:
        raise NftError(f"nft -j {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout or "{}").get("nftables", [])


def list_tables(prefix: str = "") -> list[tuple[str, str]]:
    """(family, name) of the namespace's tables whose name starts with `prefix` ([] without nft)."""
    if shutil.which("nft") is None:
        return []
    return [(t["table"]["family"], t["table"]["name"]) for t in nft_json("list", "tables")
            if "table" in t and t["table"]["name"].startswith(prefix)]
