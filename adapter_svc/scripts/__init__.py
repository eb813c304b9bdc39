"""The Lua scripts behind every multi-key change, each atomic in Redis, registered once.

Layout `v2` (`loraserve/cluster_keys.py`) gives each adapter, replica and stored copy a Redis
Cluster hash tag of its own, so each script touches the keys of ONE tag: KEYS[1] is a key of that
tag (what a Cluster client routes by), and every other key it uses is built from the same entity.
Changes that span entities are sequences of these scripts run by `registry.Registry`, owner first;
`adapter_svc/README.md` lists each sequence and the reconciliation that repairs a crash between
its steps.

One module per tag, named after the registry part (`adapter_svc/registry/`) that runs most of
its scripts:

  module            scripts on           KEYS[1]
  prelude.py        (every script)       the shared Lua helpers, `_script`, the contract all scripts keep
  adapters.py       an adapter's tag     the adapter's record
  replicas.py       a replica's tag      the replica's membership hash
  blob_refs.py      a stored copy's tag  the blob's references
  cluster_wide.py   the global tag       a global key (indexes, replica marks, routing)
"""

from __future__ import annotations

import redis.asyncio as redis

from adapter_svc.scripts import adapters, blob_refs, cluster_wide, prelude, replicas
from adapter_svc.scripts.prelude import PRELUDE

__all__ = ["PRELUDE", "SCRIPTS", "Scripts"]

# `prelude` adds PRELUDE itself, as the single module did (SCRIPT LOAD compiles it; nothing runs it).
SCRIPTS = {
    name: source
    for module in (prelude, adapters, replicas, blob_refs, cluster_wide)
    for name, source in vars(module).items()
    if name.isupper() and isinstance(source, str) and source.startswith(PRELUDE)
}


class Scripts:
    """Every script of the modules above, registered once on a client (EVALSHA, reloaded if Redis
    lost them); attributes named after the scripts in lower case."""

    def __init__(self, client: redis.Redis):
        for name, source in SCRIPTS.items():
            setattr(self, name.lower(), client.register_script(source))
