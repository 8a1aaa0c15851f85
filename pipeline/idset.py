"""A compact set of row ids, so that knowing which of a million rows are done costs megabytes, not a gigabyte.

A Python `set[str]` of a million ids costs ~100 MB; here each id is reduced to a 64-bit
BLAKE2b digest stored in an open-addressing table (`array('Q')`, load ≤ 0.7), ~12 bytes an id.
Two different ids collide with probability ~n²/2⁶⁵ (3·10⁻⁸ for a million rows); a collision
would make one row look done, never label a row twice.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from hashlib import blake2b

_MIN_SLOTS = 1 << 10


def id_key(row_id: str) -> int:
    """The 64-bit key of an id; 0 marks an empty slot, so it is never returned."""
    key = int.from_bytes(blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return key or 1


class IdSet:
    """Set of string ids with `add` (returns whether the id was new) and `in`."""

    __slots__ = ("_count", "_mask", "_table")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._table = array("Q", bytes(8 * _MIN_SLOTS))
        self._mask = _MIN_SLOTS - 1
        self._count = 0
        for row_id in ids:
            self.add(row_id)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, row_id: object) -> bool:
        if not isinstance(row_id, str):
            return False
        key = id_key(row_id)
        table, mask = self._table, self._mask
        slot = key & mask
        while True:
            held = table[slot]
            if held == key:
                return True
            if held == 0:
                return False
            slot = (slot + 1) & mask

    def add(self, row_id: str) -> bool:
        """Add an id; return True if it was not in the set before."""
        if self._insert(id_key(row_id)):
            self._count += 1
            if self._count * 10 > len(self._table) * 7:
                self._grow()
            return True
        return False

    def _insert(self, key: int) -> bool:
        table, mask = self._table, self._mask
        slot = key & mask
        while True:
            held = table[slot]
            if held == 0:
                table[slot] = key
                return True
            if held == key:
                return False
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = len(self._table) - 1
        for key in old:
            if key:
                self._insert(key)
