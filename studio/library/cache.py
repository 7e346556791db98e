"""A CPU LRU cache of canonical LoRAs read from a catalog, so switching the active set reads no file twice."""
from __future__ import annotations

from collections import OrderedDict

from .canonical import LoRA
from .catalog import Catalog


class LoRACache:
    def __init__(self, catalog: Catalog, max_items: int = 128):
        self.catalog = catalog
        self.max_items = max_items
        self._items: OrderedDict[str, LoRA] = OrderedDict()

    def get(self, name: str) -> LoRA:
        """The LoRA catalogued under `name` (id, file name or alias), loaded once and kept while recent."""
        key = str(self.catalog.get(name).id)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        lora = self.catalog.load(name)
        self._items[key] = lora
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return lora

    def __len__(self) -> int:
        return len(self._items)
