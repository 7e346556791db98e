"""Retrieval: LoRA weights and metadata as vectors, a FAISS index beside the catalog, and prompt auto-pick.

- `descriptor`: training-free weight descriptor (exact low-rank SVD per module, shared random sketches, PCA).
- `encoder`: learned AutoLoRA-style encoder, trained contrastively against a frozen text embedder.
- `text`: text embedders (base CLIP, local sentence model, hashing) and the BM25 lexical channel.
- `index`: `VectorIndex`, per-family FAISS (flat exact, IVF (fp16 codes) above a threshold).
- `library`: `LibraryIndex`, the catalog's LoRAs in every channel, persisted and refreshed incrementally.
- `autopick`: prompt -> capped, explained picks; `insert_triggers`.
- `studio`: what `Studio.retrieve` and ``generate(loras="auto")`` call.
"""
from .autopick import Pick, autopick, explain, insert_triggers, split_phrases
from .descriptor import DescriptorConfig, ModuleSVD, WeightDescriptor, lora_svds, module_svd
from .encoder import EncoderConfig, LoRAEncoder, TrainingPair, train_encoder
from .index import VectorIndex
from .library import Hit, LibraryIndex
from .text import (ClipTextEmbedder, HashingEmbedder, HFMeanPoolEmbedder, LexicalIndex, Metadata, TextEmbedder,
                   default_text_embedder)

__all__ = [
    "Pick", "autopick", "explain", "insert_triggers", "split_phrases", "DescriptorConfig", "ModuleSVD",
    "WeightDescriptor", "lora_svds", "module_svd", "EncoderConfig", "LoRAEncoder", "TrainingPair", "train_encoder",
    "VectorIndex", "Hit", "LibraryIndex", "ClipTextEmbedder", "HashingEmbedder", "HFMeanPoolEmbedder",
    "LexicalIndex", "Metadata", "TextEmbedder", "default_text_embedder",
]
