"""The one cache of derived objects: device tables, tile lists, BlockMasks, compiled functions.

Every such object is a pure function of hashable arguments (a pattern, lengths, a device), so one keyed store with a
size bound serves them all. A hit is a plain dictionary read (nothing is reordered), which keeps lookups cheap and
traceable by ``torch.compile``; beyond ``maxsize`` entries the oldest entry is dropped.
"""

from __future__ import annotations

from typing import Callable, Hashable


class BoundedCache:
    """``cache.get(key, build)``: the value stored under ``key``, or ``build()`` stored and returned on a miss."""

    def __init__(self, name: str, maxsize: int):
        self.name, self.maxsize = name, int(maxsize)
        self._items: dict = {}

    def get(self, key: Hashable, build: Callable):
        try:
            return self._items[key]
        except KeyError:
            pass
        value = build()
        if len(self._items) >= self.maxsize:
            del self._items[next(iter(self._items))]  # the oldest entry
        self._items[key] = value
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"BoundedCache({self.name!r}, {len(self)}/{self.maxsize})"
