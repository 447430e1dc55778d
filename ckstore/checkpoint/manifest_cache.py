"""A bounded cache of parsed manifests, least recently used first out, by estimated memory.

Parsing a manifest (JSON, checksum, canonical form) costs milliseconds to a
second, and a store lists its checkpoints on every save (retention) and load,
so parses are cached, keyed on the manifest's (inode, mtime, size). A parsed
manifest costs 6 to 9 times its file size in memory (measured on a 4.3 MB
manifest of 30,000 tensors, 2026-12-02, 2-core VM), so an unbounded cache of a
store with many large manifests, or of a crafted one, would exhaust memory.

Two kinds of entry share one budget (:data:`DEFAULT_BUDGET` bytes, estimated):

* full: the whole manifest, state skeleton included (what a load needs),
  costing :data:`COST_PER_BYTE` times the file size;
* summary: the manifest without its state skeleton (what listing needs:
  step, metrics, files), costing :data:`COST_PER_FILE` per file listed.

Over budget, the least recently used full entries are first demoted to
summaries, then summaries are dropped. A store with more checkpoints than
the budget holds re-parses manifests, it never grows without bound.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

from ..format.manifest import Manifest

#: Estimated bytes of memory per byte of a parsed manifest (6x measured, rounded up).
COST_PER_BYTE = 8
#: Estimated bytes per JSON value (a dict, list, string or number object and its slot): a manifest
#: of tiny containers costs more per byte than a real one (an empty dict is 64 bytes for 3 of JSON).
COST_PER_NODE = 72
#: Estimated bytes of memory per file entry of a summary (FileEntry, HashInfo, strings, dict slot).
COST_PER_FILE = 400
#: Estimated bytes per chunk digest a summary keeps (a 32-byte bytes object and its tuple slot).
COST_PER_CHUNK = 80
#: The cache's default budget: 256 MiB estimated, e.g. seven 4.3 MB manifests in full.
DEFAULT_BUDGET = 256 << 20

StatKey = tuple[int, int, int]


class _Entry(NamedTuple):
    key: StatKey
    manifest: Manifest
    cost: int
    full: bool


class ManifestCache:
    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.cost = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, name: str, key: StatKey, *, full: bool) -> Manifest | None:
        """The cached manifest of checkpoint ``name`` if its file is still ``key``; with ``full``, only a full one."""
        entry = self._entries.get(name)
        if entry is None or entry.key != key or (full and not entry.full):
            return None
        self._entries.move_to_end(name)
        return entry.manifest

    def put(self, name: str, key: StatKey, manifest: Manifest, size: int, nodes: int = 0) -> None:
        """Cache a fully parsed manifest whose file is ``size`` bytes holding ``nodes`` JSON values, then shrink to the budget."""
        self.pop(name)
        entry = _Entry(key, manifest, max(size * COST_PER_BYTE, nodes * COST_PER_NODE), True)
        self._entries[name] = entry
        self.cost += entry.cost
        self._shrink()

    def __setitem__(self, name: str, value: tuple[StatKey, Manifest]) -> None:
        """``cache[name] = (key, manifest)``: :meth:`put`, the size taken from the stat key (inode, mtime, size)."""
        key, manifest = value
        self.put(name, key, manifest, key[2])

    def pop(self, name: str, default: None = None) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.cost -= entry.cost

    def clear(self) -> None:
        self._entries.clear()
        self.cost = 0

    def entries(self) -> Iterator[Manifest]:
        return (entry.manifest for entry in self._entries.values())

    def _shrink(self) -> None:
        if self.cost <= self.budget:
            return
        # First demote full entries, oldest first, keeping the newest one whole
        # (the caller is about to use it); then drop summaries, oldest first.
        names = list(self._entries)
        for name in names[:-1]:
            if self.cost <= self.budget:
                return
            entry = self._entries[name]
            if entry.full:
                light = dataclasses.replace(entry.manifest, state=None)
                # A format-2 summary keeps every file's chunk table (verify needs it): ~1,000 digests per GiB.
                chunks = sum(len(e.chunks.digests) for e in light.files.values() if e.chunks is not None)
                cost = COST_PER_FILE * (len(light.files) + 1) + COST_PER_CHUNK * chunks
                self._entries[name] = _Entry(entry.key, light, cost, False)
                self.cost += cost - entry.cost
        for name in names[:-1]:
            if self.cost <= self.budget:
                return
            self.pop(name)
