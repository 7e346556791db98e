"""What the catalog scan stores per LoRA for retrieval (`studio.library.catalog.DEFAULT_FEATURES`), computed from
the LoRAs the scan has just read, so that indexing reads no file again: the weight descriptor's raw blocks
(`retrieval.descriptor`) and the initialisation fingerprint (`retrieval.shared_init`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from studio.library.canonical import LoRA

from .descriptor import DescriptorConfig, blocks_fingerprint, pack_svds, raw_blocks_many, stored_blocks
from .shared_init import init_fingerprints


def catalog_features(loras: Sequence[LoRA], cfg: DescriptorConfig | None = None
                     ) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """Per LoRA: (fingerprint, module names, raw blocks float16, init fingerprint float16) for `cfg` (the default
    descriptor)."""
    cfg = cfg or DescriptorConfig()
    fingerprint = blocks_fingerprint(cfg)
    packed = pack_svds(list(loras), max(cfg.top_k, 1), signs=False)   # neither depends on the signs
    prints = init_fingerprints(packed).astype(np.float16)
    return [(fingerprint, *stored_blocks(blocks, cfg), p) for blocks, p in zip(raw_blocks_many(packed, cfg), prints)]


def _fingerprint() -> str:
    """What `catalog_features` stores now: a catalog scan reads again the files it stored other features of."""
    return blocks_fingerprint(DescriptorConfig())


catalog_features.fingerprint = _fingerprint
