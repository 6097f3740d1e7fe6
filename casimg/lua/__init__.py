"""The Lua scripts casimg runs in Redis, read from this package's ``*.lua`` files.

A script is its fragments (``lib_*.lua``: Lua functions and tables shared by several scripts) followed by
its own file, concatenated in the order ``SCRIPTS`` names them; that table is the one place to see what
each script is made of. Each script's file starts with the KEYS and ARGV it takes and what it returns.
The scripts name keys only through KEYS and through the prefixes their callers take from schema.KeySpace.
"""

from __future__ import annotations

import functools
from importlib import resources

SCRIPTS: dict[str, tuple[str, ...]] = {
    # the index (index.py)
    "store": ("lib_complete", "lib_unhex", "lib_recent", "store"),
    "complete": ("lib_complete", "lib_unhex", "complete"),
    "release": ("lib_unhex", "lib_drop", "lib_recent", "release"),
    "ensure_meta": ("ensure_meta",),
    "correct_meta": ("correct_meta",),
    "lookup": ("lookup",),
    "hget_each": ("hget_each",),
    "page": ("lib_hex", "lib_filter", "page"),
    "urls_of": ("urls_of",),
    "page_recent": ("lib_recent", "lib_filter", "page_recent"),
    "repair": ("lib_unhex", "lib_hex", "lib_bucket_name", "repair"),
    "migrate": ("lib_unhex", "migrate"),  # migrate.py: the casimg 0.1 index to the current one
    "backfill_recent": ("lib_recent", "backfill_recent"),  # migrate.py
    "recent_prune": ("lib_recent", "recent_prune"),  # fsck --repair
    # the placeholder queue (placeholder_queue.py)
    "placeholder_claim": ("placeholder_claim",),
    "placeholder_fill": ("lib_unhex", "placeholder_fill"),
    # claims and tombstones of an object store's blobs (index.py, lifecycle.py)
    "claim": ("claim",),
    "unclaim": ("unclaim",),
    "tomb": ("tomb",),
    "begin_delete": ("begin_delete",),
    # variant relations and render claims (relations.py)
    "variant_add": ("lib_unhex", "variant_add"),
    "variant_drop": ("lib_unhex", "lib_drop", "variant_drop"),
    "claim_end": ("claim_end",),
    "variants_all": ("variants_all",),
    # the queue (queue.py)
    "publish": ("lib_complete", "publish"),
    "enqueue": ("enqueue",),
    "cancel": ("lib_complete", "cancel"),
    "take_over": ("take_over",),
    # webhooks.py
    "webhook_claim": ("webhook_claim",),
    "webhook_done": ("webhook_done",),
    # limits.py and keys.py
    "rate_take": ("rate_take",),
    "auth_count": ("auth_count",),
    "create_key": ("create_key",),
}


@functools.cache
def fragment(name: str) -> str:
    """One ``.lua`` file of this package, as text."""
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


@functools.cache
def source(script: str) -> str:
    """The full source of a script named in SCRIPTS: its fragments, then its own file."""
    return "".join(fragment(part) for part in SCRIPTS[script])
