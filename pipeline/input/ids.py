"""Compact id sets and maps, so that knowing which of a million rows are done costs megabytes, not a gigabyte.

A Python `set[str]` of a million ids costs ~100 MB; here each id is reduced to a 64-bit
BLAKE2b digest kept in `array('Q')` storage: ~10 bytes an id in `IdSet` (with a 16-bit tag), ~18 in `IdMap`.
Two different ids collide with probability ~n²/2⁶⁵ (3·10⁻⁸ for a million rows); a collision
would make one row look done, never label a row twice.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from hashlib import blake2b

_MIN_SLOTS = 1 << 10


def id_key(row_id: str) -> int:
    """The 64-bit key of an id; 0 marks an empty slot, so it is never returned."""
    key = int.from_bytes(blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return key or 1


class _KeyTable:
    """Open addressing with linear probing over 64-bit keys (uniform already: they are hashes)."""

    __slots__ = ("_count", "_keys", "_mask")

    def __init__(self) -> None:
        self._keys = array("Q", bytes(8 * _MIN_SLOTS))
        self._mask = _MIN_SLOTS - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _slot(self, key: int) -> int:
        """The slot holding `key`, or the empty slot where it would go."""
        keys, mask = self._keys, self._mask
        slot = key & mask
        while True:
            held = keys[slot]
            if held == key or held == 0:  # noqa: PLR1714 - hot loop: no tuple built per probe
                return slot
            slot = (slot + 1) & mask

    def _claim(self, slot: int, key: int) -> None:
        self._keys[slot] = key
        self._count += 1
        if self._count * 10 > len(self._keys) * 7:
            self._grow()

    def _grow(self) -> None:
        old = self._keys
        self._keys = array("Q", bytes(16 * len(old)))
        self._mask = len(self._keys) - 1
        self._rehash(old)

    def _rehash(self, old: array[int]) -> None:
        for key in old:
            if key:
                self._keys[self._slot(key)] = key


class _TaggedTable(_KeyTable):
    """A key table with a 16-bit tag beside each key."""

    __slots__ = ("_tags",)

    def __init__(self) -> None:
        super().__init__()
        self._tags = array("H", bytes(2 * _MIN_SLOTS))

    def _grow(self) -> None:
        old_keys, old_tags = self._keys, self._tags
        self._keys = array("Q", bytes(16 * len(old_keys)))
        self._tags = array("H", bytes(4 * len(old_keys)))
        self._mask = len(self._keys) - 1
        for key, tag in zip(old_keys, old_tags, strict=True):
            if key:
                slot = self._slot(key)
                self._keys[slot] = key
                self._tags[slot] = tag

    def packed(self) -> list[int]:
        """Every entry as `key << 16 | tag`, sorted by key."""
        return sorted(k << 16 | t for k, t in zip(self._keys, self._tags, strict=True) if k)


class _Run:
    """An immutable sorted run of keys with their tags."""

    __slots__ = ("keys", "tags")

    def __init__(self, packed: Iterable[int]) -> None:
        self.keys = array("Q")
        self.tags = array("H")
        for entry in packed:
            self.keys.append(entry >> 16)
            self.tags.append(entry & 0xFFFF)

    def __len__(self) -> int:
        return len(self.keys)

    def packed(self) -> Iterator[int]:
        """Entries as `key << 16 | tag`, in key order."""
        return (k << 16 | t for k, t in zip(self.keys, self.tags, strict=True))

    def find(self, key: int) -> int:
        """The index of `key`, or -1."""
        i = bisect_left(self.keys, key)
        return i if i < len(self.keys) and self.keys[i] == key else -1


class IdSet:
    """Set of string ids with `add` (returns whether the id was new) and `in`; each id may carry a 16-bit tag.

    The tag is a few bits of the row's text fingerprint, so a resumed run can tell that a done id now has
    different text (missing 1 change in 65,536); 0 means unknown.

    New keys go to a small hash table; every 16k of them are sorted into an immutable run (`array('Q')` keys
    and `array('H')` tags), and runs of similar size are merged up to 128k keys, so the set costs ~10 bytes
    an id plus ~2 MB and never doubles its memory to grow: a hash table of a million keys needs 16 MB, and
    24 MB at the moment it grows (measured). A lookup probes the table, then bisects each run (≤ 3 + n/128k
    of them).
    """

    __slots__ = ("_recent", "_run_cap", "_runs", "_seal_at", "_size")

    def __init__(self, ids: Iterable[str] = (), *, seal_at: int = 1 << 14, run_cap: int = 1 << 17) -> None:
        self._seal_at = seal_at
        self._run_cap = run_cap
        self._recent = _TaggedTable()
        self._runs: list[_Run] = []
        self._size = 0
        for row_id in ids:
            self.add(row_id)

    def __len__(self) -> int:
        return self._size

    @classmethod
    def bulk(cls, entries: Iterable[tuple[str, int]]) -> tuple[IdSet, int]:
        """Build a set from many (id, tag) pairs at once (a sink being resumed); also return how many were repeats.

        Keys are sorted a run at a time instead of probed one by one: ~2 s for a million ids, not ~10.
        """
        made = cls()
        chunk: list[int] = []
        for row_id, tag in entries:
            chunk.append(id_key(row_id) << 16 | tag)
            if len(chunk) >= made._run_cap:
                chunk.sort()
                made._runs.append(_Run(chunk))
                chunk = []
        if chunk:
            chunk.sort()
            made._runs.append(_Run(chunk))
        # One pass over all runs in key order finds every repeat, within a run or across runs.
        total = repeats = 0
        last = -1
        for key in heapq.merge(*(run.keys for run in made._runs)):
            total += 1
            repeats += key == last
            last = key
        made._size = total - repeats
        return made, repeats

    def __contains__(self, row_id: object) -> bool:
        if not isinstance(row_id, str):
            return False
        return self.tag_of(row_id) is not None

    def tag_of(self, row_id: str) -> int | None:
        """The tag stored with `row_id` (0: unknown), or None when the id is not in the set."""
        key = id_key(row_id)
        recent = self._recent
        slot = recent._slot(key)
        if recent._keys[slot] == key:
            return recent._tags[slot]
        for run in self._runs:
            i = run.find(key)
            if i >= 0:
                return run.tags[i]
        return None

    def add(self, row_id: str, tag: int = 0) -> bool:
        """Add an id with its tag; return True if it was not in the set before (an id already in keeps its tag)."""
        key = id_key(row_id)
        recent = self._recent
        slot = recent._slot(key)
        if recent._keys[slot] == key or any(run.find(key) >= 0 for run in self._runs):
            return False
        recent._tags[slot] = tag
        recent._claim(slot, key)
        self._size += 1
        if len(recent) >= self._seal_at:
            self._seal()
        return True

    def _seal(self) -> None:
        """Turn the hash table into a sorted run; merge runs of similar size (bounded by run_cap)."""
        run = _Run(self._recent.packed())
        self._recent = _TaggedTable()
        runs = self._runs
        while runs and len(runs[-1]) <= len(run) and len(runs[-1]) + len(run) <= self._run_cap:
            run = _Run(heapq.merge(runs.pop().packed(), run.packed()))
        runs.append(run)


class IdMap(_KeyTable):
    """Map from id to a small integer (e.g. an index into the distinct labels), ~18 bytes an entry."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        super().__init__()
        self._values = array("I", bytes(4 * _MIN_SLOTS))

    def get(self, row_id: str) -> int | None:
        """The value stored for `row_id`, or None."""
        key = id_key(row_id)
        slot = self._slot(key)
        return self._values[slot] if self._keys[slot] == key else None

    def set(self, row_id: str, value: int) -> None:
        """Store `value` for `row_id` (a later value replaces an earlier one)."""
        key = id_key(row_id)
        slot = self._slot(key)
        if self._keys[slot] == key:
            self._values[slot] = value
            return
        self._values[slot] = value
        self._claim(slot, key)

    def _grow(self) -> None:
        old_keys, old_values = self._keys, self._values
        self._keys = array("Q", bytes(16 * len(old_keys)))
        self._values = array("I", bytes(8 * len(old_keys)))
        self._mask = len(self._keys) - 1
        for key, value in zip(old_keys, old_values, strict=True):
            if key:
                slot = self._slot(key)
                self._keys[slot] = key
                self._values[slot] = value
