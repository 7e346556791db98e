"""`LibraryIndex`: the catalog's LoRAs as searchable vectors, persisted beside the catalog.

Channels (each a `VectorIndex`, one FAISS sub-index per base family):

- ``descriptor``: the training-free weight descriptor (LoRA↔LoRA similarity, categories when tags are missing);
- ``neighbours``: the weights-only vector by neighbour transfer (`retrieval.neighbours`: the metadata texts of
  the LoRAs whose weights are nearest, text space, no metadata of the LoRA itself; the default weights channel);
- ``weights``: the learned encoder's vector of the weights alone (text space: prompt → LoRA, no metadata used);
- ``joint``: the learned encoder with the metadata token, when the encoder has one;
- ``meta``: the text embedder's vector of the metadata text (LoRAs with metadata only);
- ``lexical``: BM25 over trigger words, name, tags and description (in memory, rebuilt from the catalog).

Files, beside ``catalog.sqlite``: ``catalog.sqlite.faiss`` (every channel's FAISS indices),
``catalog.sqlite.faiss.json`` (manifest: per-LoRA stamps = tensor hash + metadata hash + family, the
fingerprints of the embedder, encoder and descriptor, calibration) and ``catalog.sqlite.descriptor.npz``
(descriptor layouts and PCA). `refresh` adds and removes only what changed in the catalog; a missing, corrupt
or incompatible index is rebuilt from the catalog (so is a family that has grown past twice the size its
descriptor PCA was fitted on).

The descriptor's raw blocks come from the catalog when its scan stored them for this descriptor's settings
(`descriptor.blocks_fingerprint`) and the same tensors; only the other LoRAs' files are read for them. With an
encoder, the files of the LoRAs it encodes are read too (it needs their factors), for the encoder alone when their
blocks are stored. Both ways give the same blocks (float16). Likewise the
metadata-text vectors a big scan stored (`catalog_text_vectors`) are used when they come from this index's text
embedder (same fingerprint) and the same text; the other texts are embedded here.
Family is a hard filter in every search: LoRAs of another family are never candidates.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from studio.gc_pause import bulk_gc_thresholds, rare_collections

from .descriptor import (DescriptorConfig, WeightDescriptor, blocks_fingerprint, pack_svds, raw_blocks_many,
                         stored_blocks)
from .index import VectorIndex, atomic_write
from .loading import read_factors
from .neighbours import ContentRows, attention_factors, content_space, neighbour_vectors
from .shared_init import init_fingerprints
from .text import LexicalIndex, Metadata, TextEmbedder, contains_word, stems, text_key

log = logging.getLogger(__name__)

VERSION = 1
DENSE = ("descriptor", "neighbours", "weights", "joint", "meta")
# Fused score: the weighted mean of a LoRA's calibrated channel scores. BM25 weighs a quarter of a dense channel:
# it also matches incidental words ("background", "circle", "lines" of a prompt promote LoRAs whose metadata has
# them), and the dense metadata channel already ranks trigger words and names first. On TinyWorld
# (`bench/retrieval.py`, 4 projection draws) weight 1 -> 0.25 took fused R@3 from 0.86 to 0.90 on paraphrase
# prompts and R@1 from 0.54 to 0.62 on "<trigger> on a plain background, red circle, centred", with prompts that
# name a trigger word or the concept's noun still all first (R@1 1.0; 0.96 with no BM25 at all).
# The neighbours channel (a LoRA's weights -> the metadata of the LoRAs they resemble) has weight
# `DEFAULT_FUSION["neighbours"]` where a LoRA has metadata of its own, which says the same first-hand, and weight 1
# where it has none (there the channel is all the LoRA has); 0: it counts only for LoRAs without metadata. On
# TinyWorld's library with one seed per file (most LoRAs independently initialised, `bench/retrieval.py`), weight
# 0.5 / 0.25 / 0 gave fused R@3 / MRR 0.923 / 0.822, 0.981 / 0.890, 0.962 / 0.905 on the benchmark prompts and
# 0.865 / 0.751, 0.865 / 0.751, 0.885 / 0.801 on the second set (0 over 4 projection draws: R@3 0.971 / 0.889).
# On the earlier library, where most LoRAs shared a seed with others, 0.5 had been best (0.976 / 0.885 over 4 draws).
DEFAULT_FUSION = {"neighbours": 0.0, "weights": 1.0, "joint": 1.0, "meta": 1.0, "lexical": 0.25}
MODES = {
    "fused": ("joint|weights|neighbours", "meta", "lexical"),
    "metadata": ("meta", "lexical"),
    "weights": ("neighbours|weights",),
    "encoder": ("weights",),
    "meta": ("meta",),
    "lexical": ("lexical",),
    "joint": ("joint",),
}
# Search results list a model's further versions after the next VERSION_SPREAD other models' best versions, so
# the top three are three different LoRAs where the library has them (`LibraryIndex._versions_after`).
VERSION_SPREAD = 2


@dataclass
class IndexedEntry:
    id: int
    name: str
    family: str
    stamp: str
    meta: Metadata
    path: str = ""

    @property
    def trigger(self) -> str | None:
        return self.meta.trigger_words[0] if self.meta.trigger_words else None


def _entry_json(e: IndexedEntry) -> dict:
    """`asdict(e)` for the manifest, without its deep copies (a tenth of a 10 000-LoRA rebuild's time)."""
    m = e.meta
    return {"id": e.id, "name": e.name, "family": e.family, "stamp": e.stamp, "path": e.path,
            "meta": {"name": m.name, "trigger_words": m.trigger_words, "description": m.description,
                     "tags": m.tags, "alias": m.alias}}


@dataclass
class Hit:
    """One search result: fused score in [0, 1] and what each channel said (calibrated, in [0, 1])."""

    id: int
    name: str
    family: str
    score: float
    channels: dict[str, float] = field(default_factory=dict)
    raw: dict[str, float] = field(default_factory=dict)
    matched: list[str] = field(default_factory=list)
    trigger: str | None = None
    model: str = ""          # the model this LoRA is a version of (`LibraryIndex.model_of`)


@dataclass
class RefreshReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rebuilt: bool = False
    reason: str = ""
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    files_read: int = 0      # LoRA files read for their factors
    from_catalog: int = 0    # LoRAs whose descriptor blocks came from the catalog (no file read)
    texts_from_catalog: int = 0   # metadata texts whose vectors came from the catalog (not embedded here)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rebuilt)


def _stamp(entry) -> str:
    return f"{entry.tensor_hash}:{Metadata.of(entry).hash()}:{entry.family}"


class LibraryIndex:
    """Search a catalog's LoRAs by prompt (fused channels) or by another LoRA (descriptor).

    >>> lib = LibraryIndex.open(catalog, text_embedder=ClipTextEmbedder.from_folder(model), encoder=enc)
    >>> lib.search("a spooky floating sheet", k=5, family="tinyworld")
    """

    def __init__(self, catalog, *, text_embedder: TextEmbedder | None = None, encoder=None,
                 descriptor_config: DescriptorConfig | None = None, ivf_threshold: int = 50_000,
                 fusion: dict[str, float] | None = None, include_unknown_family: bool = False,
                 workers: int | None = None, stored_features: bool = True):
        """`stored_features`: use the descriptor blocks the catalog scan stored (False: read every file)."""
        self.catalog = catalog
        base = Path(catalog.db_path)
        self.index_path = base.with_name(base.name + ".faiss")
        self.manifest_path = base.with_name(base.name + ".faiss.json")
        self.descriptor_path = base.with_name(base.name + ".descriptor.npz")
        self.text = text_embedder
        self.encoder = encoder
        if encoder is not None and text_embedder is not None and encoder.config.out_dim != text_embedder.dim:
            log.warning("encoder output (%d) does not match the text embedder (%d): weights channel off",
                        encoder.config.out_dim, text_embedder.dim)
            self.encoder = None
        if self.encoder is not None and self.text is not None and self.encoder.config.text_embedder \
                and self.encoder.config.text_embedder != self.text.fingerprint():
            log.warning("the encoder was trained against another text embedder (%s, here %s): its scores may be "
                        "meaningless", self.encoder.config.text_embedder, self.text.fingerprint())
        self.descriptor = WeightDescriptor(descriptor_config)
        self.ivf_threshold = ivf_threshold
        self.fusion = dict(DEFAULT_FUSION, **(fusion or {}))
        self.include_unknown_family = include_unknown_family
        self.workers = workers
        self.stored_features = stored_features
        self.entries: dict[int, IndexedEntry] = {}
        self.vectors: dict[str, VectorIndex] = {}
        self.members: dict[str, set[int]] = {}
        self.calibration: dict[str, float] = {}
        self.lexical = LexicalIndex()
        # id -> (attention names, content factors, init print): until the neighbours channel is built
        self._content: dict[int, tuple] = {}
        self.neighbour_sources: dict[int, list[int]] = {}   # id -> the LoRAs whose metadata its neighbours vector took
        self._forget_derived()
        self._reset_vectors()

    # ------------------------------------------------------------------------------------------------ setup
    @classmethod
    def open(cls, catalog, refresh: bool = True, **kw) -> LibraryIndex:
        """Load the persisted index (rebuilt from the catalog when missing or stale) and bring it up to date."""
        self = cls(catalog, **kw)
        if refresh:
            self.refresh()
        else:
            self.load()
        return self

    def _dims(self) -> dict[str, int]:
        dims = {"descriptor": self.descriptor.dim}
        if self.text is not None:
            dims["meta"] = dims["neighbours"] = self.text.dim
        if self.encoder is not None:
            dims["weights"] = self.encoder.config.out_dim
            if self.encoder.config.meta_dim and self.text is not None:
                dims["joint"] = self.encoder.config.out_dim
        return dims

    def _reset_vectors(self) -> None:
        self.vectors = {ch: VectorIndex(d, self.ivf_threshold) for ch, d in self._dims().items()}
        self.members = {ch: set() for ch in self.vectors}

    def fingerprints(self) -> dict[str, str]:
        return {
            "text": self.text.fingerprint() if self.text is not None else "",
            "encoder": self.encoder.fingerprint() if self.encoder is not None else "",
            "descriptor_config": json.dumps(asdict(self.descriptor.config), sort_keys=True),
        }

    # ------------------------------------------------------------------------------------------------ disk
    def save(self) -> None:
        generation = secrets.token_hex(8)
        header, blobs = {"generation": generation, "channels": []}, []
        for ch, vi in self.vectors.items():
            blob = vi.to_bytes()
            header["channels"].append({"channel": ch, "bytes": len(blob)})
            blobs.append(blob)
        head = json.dumps(header).encode()
        atomic_write(self.index_path, len(head).to_bytes(8, "little") + head + b"".join(blobs))
        self.descriptor.save(self.descriptor_path)
        manifest = {
            "version": VERSION, "generation": generation, "fingerprints": self.fingerprints(),
            "descriptor": self.descriptor.fingerprint(), "calibration": self.calibration,
            "neighbour_sources": {str(i): v for i, v in self.neighbour_sources.items()},
            "entries": {str(i): _entry_json(e) for i, e in self.entries.items()},
        }
        atomic_write(self.manifest_path, json.dumps(manifest).encode())

    def load(self) -> str | None:
        """Load the persisted index; None on success, else why it cannot be used (then nothing is loaded)."""
        if not (self.index_path.is_file() and self.manifest_path.is_file() and self.descriptor_path.is_file()):
            return "no index on disk"
        try:
            manifest = json.loads(self.manifest_path.read_text())
            if manifest.get("version") != VERSION:
                return f"index version {manifest.get('version')} (this code writes {VERSION})"
            if manifest.get("fingerprints") != self.fingerprints():
                return "the text embedder, encoder or descriptor settings changed"
            descriptor = WeightDescriptor.load(self.descriptor_path)
            if descriptor.fingerprint() != manifest.get("descriptor"):
                return "descriptor file does not match the manifest"
            data = self.index_path.read_bytes()
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n].decode())
            if header.get("generation") != manifest.get("generation"):
                return "index and manifest are from different saves"
            vectors, offset = {}, 8 + n
            for item in header["channels"]:
                vectors[item["channel"]] = VectorIndex.from_bytes(data[offset:offset + item["bytes"]])
                offset += item["bytes"]
            dims = self._dims()
            if {ch: v.dim for ch, v in vectors.items()} != dims:
                return "channels changed"
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as e:
            return f"unreadable index ({type(e).__name__}: {e})"
        self.descriptor = descriptor
        self.vectors = vectors
        for vi in self.vectors.values():
            vi.ivf_threshold = self.ivf_threshold
        self.members = {ch: set(int(i) for i in vi.ids()) for ch, vi in vectors.items()}
        self.calibration = manifest.get("calibration", {})
        self.neighbour_sources = {int(i): v for i, v in manifest.get("neighbour_sources", {}).items()}
        self.entries = {}
        for key, e in manifest["entries"].items():
            e = dict(e)
            e["meta"] = Metadata(**e["meta"])
            self.entries[int(key)] = IndexedEntry(**e)
        self._build_lexical()
        return None

    # ------------------------------------------------------------------------------------------------ build
    def _catalog_entries(self) -> dict[int, object]:
        return {e.id: e for e in self.catalog.all() if e.status == "ok"}

    def refresh(self) -> RefreshReport:
        """Bring the index up to date with the catalog: incremental when possible, else a full rebuild."""
        with rare_collections():
            return self._refresh()

    def _refresh(self) -> RefreshReport:
        started = time.monotonic()
        why = self.load() if not self.entries else None
        if why is not None:
            report = self.rebuild()
            report.reason = why
            return report
        current = self._catalog_entries()
        stamps = {i: _stamp(e) for i, e in current.items()}
        gone = [i for i, e in self.entries.items() if stamps.get(i) != e.stamp]
        new = [current[i] for i in current if i not in self.entries or self.entries[i].stamp != stamps[i]]
        # a family that has grown a lot since the descriptor's PCA was fitted: refit on everything
        for fam in {e.family for e in new}:
            fitted = self.descriptor.fitted_on.get(fam, 0)
            total = sum(1 for e in current.values() if e.family == fam)
            if fam not in self.descriptor.layouts or (total >= 8 and total > 2 * fitted):
                report = self.rebuild()
                report.reason = f"{fam}: {total} LoRAs, the descriptor was fitted on {fitted}"
                return report
        report = RefreshReport()
        if gone:
            for vi in self.vectors.values():
                vi.remove(gone)
            for ch in self.members:
                self.members[ch].difference_update(gone)
            report.removed = [self.entries.pop(i).name for i in gone]
        if new:
            self._add_entries(new, report)
        if report.changed:
            self._build_lexical()
            self._build_neighbours()
            self._calibrate()
            self.save()
        report.seconds = time.monotonic() - started
        return report

    def rebuild(self) -> RefreshReport:
        """Index every LoRA of the catalog from scratch (fits the descriptor's layouts and PCA)."""
        with rare_collections():
            return self._rebuild()

    def _rebuild(self) -> RefreshReport:
        started = time.monotonic()
        report = RefreshReport(rebuilt=True)
        self._reset_vectors()
        self.entries = {}
        entries = list(self._catalog_entries().values())
        cfg = self.descriptor.config
        self.descriptor = WeightDescriptor(cfg)
        # phase 1: up to max_fit LoRAs per family fix the layouts and the PCA; phase 2 streams the rest
        by_family: dict[str, list] = {}
        for e in entries:
            by_family.setdefault(e.family, []).append(e)
        first, rest = [], []
        rng = np.random.default_rng(cfg.seed)
        for group in by_family.values():
            group = [group[i] for i in rng.permutation(len(group))]  # an unbiased sample fits the PCA
            n_fit = cfg.fit_size(max(e.n_modules or 1 for e in group))
            first += group[:n_fit]
            rest += group[n_fit:]
        featurizer = self._featurizer(entries)
        with featurizer as run:
            results = list(run(first))
            self.descriptor.fit([(r.names[j], r.blocks[j], e.family)
                                 for r, _ in results for j, e in enumerate(r.entries)])
            for r, _ in results:
                self._add_features(r, report)
            for r, _ in run(rest):
                self._add_features(r, report)
        report.texts_from_catalog = featurizer.texts_from_catalog
        self._build_lexical()
        self._build_neighbours()
        self._calibrate()
        self.save()
        report.seconds = time.monotonic() - started
        return report

    def _add_entries(self, entries: Sequence, report: RefreshReport) -> None:
        featurizer = self._featurizer(entries)
        with featurizer as run:
            for r, _ in run(entries):
                self._add_features(r, report)
        report.texts_from_catalog += featurizer.texts_from_catalog

    def _top_k(self) -> int:
        return max(self.descriptor.config.top_k, self.encoder.config.top_k if self.encoder is not None else 1)

    def _featurizer(self, entries: Sequence, encode: bool = True):
        """Context manager giving ``run(entries) -> [(Features, None)]`` for (a subset of) `entries`: blocks stored
        by the catalog where they fit, files read (in worker processes when it pays) for the others; metadata-text
        vectors likewise from the catalog where they fit, embedded here for the others. `encode=False`: blocks and
        init prints only (no encoder, no text)."""
        return _FeaturizerPool(self, entries, encode=encode)

    def _stored(self, entries: Sequence) -> dict[int, str]:
        """{id: tensor hash} of the entries whose descriptor blocks can come from the catalog."""
        if not self.stored_features or not hasattr(self.catalog, "feature_ids"):
            return {}
        found = self.catalog.feature_ids(blocks_fingerprint(self.descriptor.config))
        return {e.id: e.tensor_hash for e in entries if found.get(e.id) == e.tensor_hash and e.tensor_hash}

    def _encodes(self, entry) -> bool:
        """Whether the encoder encodes this LoRA (its family): then its file is read, the encoder needs the factors."""
        return self.encoder is not None and self.encoder.config.encodes(entry.family)

    def _add_features(self, r: Features, report: RefreshReport) -> None:
        report.failed += r.failed
        report.files_read += r.files_read
        report.from_catalog += r.from_catalog
        if not r.entries:
            return
        ids = np.array([e.id for e in r.entries], dtype=np.int64)
        fams = [e.family for e in r.entries]
        metas = [Metadata.of(e) for e in r.entries]
        desc = self.descriptor.vectors([(r.names[j], r.blocks[j], e.family) for j, e in enumerate(r.entries)])
        self._add("descriptor", ids, desc, fams)
        if r.meta_vecs is not None:
            has = np.array([m.has_text for m in metas])
            if has.any():
                self._add("meta", ids[has], r.meta_vecs[has], [f for f, h in zip(fams, has) if h])
        for ch in ("weights", "joint"):
            if ch in self.vectors and getattr(r, ch) is not None and len(r.encoded):
                sel = np.array(r.encoded)
                self._add(ch, ids[sel], getattr(r, ch), [fams[j] for j in r.encoded])
        for j, (e, m) in enumerate(zip(r.entries, metas)):
            self.entries[e.id] = IndexedEntry(e.id, e.name, e.family, _stamp(e), m, str(e.path))
            report.added.append(e.name)
            self._content[e.id] = (*attention_factors(r.names[j], r.blocks[j], self.descriptor.config),
                                   r.init_prints[j])
        self._forget_derived()

    def build_neighbours(self, sources: set[int] | None = None) -> None:
        """(Re)build the ``neighbours`` channel: every LoRA's weights-only vector from the metadata texts of the
        LoRAs nearest in weights (`retrieval.neighbours`), per family. `sources`: the ids whose metadata may be
        transferred (default: every LoRA with metadata; a benchmark passes its training split)."""
        self._build_neighbours(sources)
        self._calibrate()

    def _build_neighbours(self, sources: set[int] | None = None) -> None:
        if "neighbours" not in self.vectors:
            self._content = {}
            return
        self.vectors["neighbours"].clear()
        self.members["neighbours"] = set()
        self.neighbour_sources = {}
        self._bg.pop("neighbours", None)   # the channel's background sample (query baselines) is rebuilt with it
        missing = [i for i in self.entries if i not in self._content]
        if missing:   # after an incremental refresh: the unchanged LoRAs' features again (catalog, else files)
            current = self._catalog_entries()
            with self._featurizer([current[i] for i in missing if i in current], encode=False) as run:
                for r, _ in run([current[i] for i in missing if i in current]):
                    for j, e in enumerate(r.entries):
                        self._content[e.id] = (*attention_factors(r.names[j], r.blocks[j], self.descriptor.config),
                                               r.init_prints[j])
        meta = self.members.get("meta", set())
        for fam in sorted({e.family for e in self.entries.values()}):
            ids = np.array(sorted(i for i, e in self.entries.items() if e.family == fam and i in self._content))
            src = np.array([i in meta and (sources is None or i in sources) for i in ids], dtype=bool)
            if not src.any():
                continue
            X = content_space(ContentRows([self._content[i][:2] for i in ids], self.descriptor.config),
                              np.stack([self._content[i][2] for i in ids]).astype(np.float32))
            texts = np.stack([self.vectors["meta"].reconstruct(int(i)) for i in ids[src]])
            V, has, used = neighbour_vectors(X, src, texts)
            for row in np.flatnonzero(has):
                self.neighbour_sources[int(ids[row])] = [int(ids[j]) for j in used[row]]
            if has.any():
                self._add("neighbours", ids[has], V[has], [fam] * int(has.sum()))
        self._content = {}

    def resembles(self, id_: int, n: int = 2) -> list[str]:
        """Names of the LoRAs (with metadata) whose weights are nearest to this one's: where its ``neighbours``
        vector came from."""
        return [self.entries[i].name for i in self.neighbour_sources.get(id_, [])[:n] if i in self.entries]

    def named(self, prompt: str, family: str | Sequence[str] | None = None) -> list[int]:
        """Ids of the LoRAs whose first trigger word `prompt` writes (as a whole word or phrase), of these families.
        Only a word that is mostly some LoRA's *first* trigger word counts: kohya's top training tags also count as
        trigger words, and "background" in a prompt must not name every LoRA whose tags have it."""
        if self._trigger_map is None:   # first trigger word -> ids, in the order the entries name them
            self._trigger_map = {}
            for i, e in self.entries.items():
                if e.trigger and len(e.trigger) >= 3:
                    self._trigger_map.setdefault(e.trigger.lower(), []).append(i)
            self._trigger_phrases = [t for t in self._trigger_map if " " in t]   # matched as phrases
            self._trigger_order = {t: k for k, t in enumerate(self._trigger_map)}
        by_trigger = self._trigger_map
        found = {t for t in re.findall(r"[\w-]+", prompt.lower()) if t in by_trigger}   # a look-up per word
        found.update(t for t in self._trigger_phrases if contains_word(prompt, t))
        fams = set(self.families(family))
        out = []
        for trig in sorted(found, key=self._trigger_order.__getitem__):
            ids = by_trigger[trig]
            df = max((self.lexical.df(s) for s in stems(trig)), default=0)
            if len(ids) >= 0.5 * df:
                out += [i for i in ids if self.entries[i].family in fams]
        return out

    def model_of(self, id_: int) -> str:
        """The model a LoRA is a version of, as a name: its metadata's model name (Civitai model, kohya output name
        or modelspec title) or first trigger word, with the description: what the versions of one model share. A
        LoRA without either is a model of its own (grouping such LoRAs by the weights they resemble cost the
        second prompt set's fused R@3 0.05 over four descriptor draws on TinyWorld; `resembles` still says it)."""
        entry = self._model_table().get(id_)
        return entry[1] if entry is not None else ""

    def _model_table(self) -> dict[int, tuple[tuple, str]]:
        """{id: (what identifies its model, the model's name)}, made once per indexed set (see `model_of`)."""
        if self._models is None:
            self._models = {}
            for i, e in self.entries.items():
                m = e.meta
                if m.alias or e.trigger:
                    key = ((m.alias or "").lower(), (e.trigger or "").lower(), m.description.strip().lower())
                    self._models[i] = (key, m.alias or e.trigger)
                else:
                    self._models[i] = (("", "", f"#{i}"), e.name)
        return self._models

    def _versions_after(self, hits: list[Hit], named: set[int] = frozenset()) -> list[Hit]:
        """`hits` with a model's further versions (`model_of`) each moved after the next `VERSION_SPREAD` other
        models' best versions: the first results show different LoRAs, not one LoRA's ranks and seeds, and a version is
        still listed close to where it scored. The `named` LoRAs (the prompt writes their trigger word) stay
        where they are, first: the prompt asks for them."""
        models = self._model_table()
        out, waiting, seen = [], [], set()
        for h in hits:
            key = models[h.id][0]
            if h.id in named:
                out.append(h)
                seen.add(key)
                continue
            if key in seen:
                waiting.append([h, 0])
                continue
            seen.add(key)
            out.append(h)
            for w in waiting:
                w[1] += 1
            while waiting and waiting[0][1] >= VERSION_SPREAD:
                out.append(waiting.pop(0)[0])
        return out + [h for h, _ in waiting]

    def _forget_derived(self) -> None:
        """Drop what is derived from the indexed set (categories, trigger map, models, score baselines) after a
        change."""
        self._categories = self._trigger_map = self._models = None
        self._bg: dict[str, np.ndarray | None] = {}

    def _add(self, channel: str, ids: np.ndarray, vecs: np.ndarray, fams: Sequence[str]) -> None:
        self.vectors[channel].add(ids, vecs, list(fams))
        self.members[channel].update(int(i) for i in ids)

    def _build_lexical(self) -> None:
        self.lexical = LexicalIndex().build((i, e.meta, e.family) for i, e in self.entries.items())
        self._vocab = self.lexical.vocab
        self._forget_derived()

    def _calibrate(self, n_queries: int = 300, n_targets: int = 2000, seed: int = 0) -> None:
        """Per dense channel, the median similarity of a metadata text to *other* LoRAs: the score that means
        "nothing in particular". Calibrated score = (s - median) / (1 - median), clipped to [0, 1]."""
        self.calibration = {}
        rng = np.random.default_rng(seed)
        q_ids = sorted(self.members.get("meta", ()))
        if not q_ids:
            return
        q_ids = list(rng.choice(q_ids, min(n_queries, len(q_ids)), replace=False))
        Q = np.stack([self.vectors["meta"].reconstruct(i) for i in q_ids])
        for ch in ("meta", "neighbours", "weights", "joint"):
            if ch not in self.vectors or len(self.members[ch]) < 2:
                continue
            t_ids = sorted(self.members[ch])
            t_ids = list(rng.choice(t_ids, min(n_targets, len(t_ids)), replace=False))
            T = np.stack([self.vectors[ch].reconstruct(i) for i in t_ids])
            S = Q @ T.T
            off = np.array(q_ids)[:, None] != np.array(t_ids)[None, :]
            if off.any():
                self.calibration[ch] = float(np.median(S[off]))

    # ------------------------------------------------------------------------------------------------ search
    def families(self, family: str | Sequence[str] | None) -> list[str]:
        """The families a search covers: all when None, else the given ones (+ "unknown" if so configured)."""
        if family is None:
            return sorted({e.family for e in self.entries.values()})
        fams = [family] if isinstance(family, str) else list(family)
        if self.include_unknown_family and "unknown" not in fams:
            fams.append("unknown")
        return fams

    def calibrated(self, channel: str, score: float, mu: float | None = None) -> float:
        """A channel's raw score on a common [0, 1] scale: (s - mu) / (1 - mu), mu the score that means "nothing
        in particular" (the query's own median over the library when given, else the channel's median)."""
        if channel == "lexical":
            return float(np.clip(score, 0.0, 1.0))
        if mu is None:
            mu = self.calibration.get(channel, 0.0)
        return float(np.clip((score - mu) / max(1.0 - mu, 1e-6), 0.0, 1.0))

    def _background(self, channel: str) -> np.ndarray | None:
        """A fixed sample of up to 512 of a channel's vectors: what a query's similarity to LoRAs it has nothing
        to do with looks like (its median is that query's baseline)."""
        if channel not in self._bg:
            ids = sorted(self.members.get(channel, ()))
            if len(ids) > 512:
                ids = sorted(np.random.default_rng(0).choice(ids, 512, replace=False).tolist())
            self._bg[channel] = np.stack([self.vectors[channel].reconstruct(i) for i in ids]) if len(ids) >= 8 \
                else None
        return self._bg[channel]

    def _channels(self, mode: str) -> list[str]:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {sorted(MODES)}")
        out = []
        for spec in MODES[mode]:
            for ch in spec.split("|"):
                if ch == "lexical" or ch in self.vectors:
                    out.append(ch)
                    break
        if mode in ("encoder", "joint") and not out:
            raise ValueError(f"mode {mode!r} needs a trained encoder (and a text embedder)")
        if mode == "weights" and not out:
            raise ValueError("mode 'weights' needs a text embedder")
        if mode in ("meta",) and "meta" not in self.vectors:
            raise ValueError("mode 'meta' needs a text embedder")
        return out

    def search(self, prompt: str, k: int = 10, family: str | Sequence[str] | None = None, mode: str = "fused",
               depth: int | None = None) -> list[Hit]:
        """LoRAs for a prompt, best first. `mode`: fused, metadata, weights (neighbour transfer, else the encoder),
        encoder, meta, lexical or joint. In fused and metadata modes a LoRA whose trigger word the prompt writes
        (`named`) ranks before the others, as it does in auto-pick, and a model's further versions (`model_of`)
        come after the next two other models' best (`VERSION_SPREAD`)."""
        return self.search_many([prompt], k, family, mode, depth)[0]

    def search_many(self, prompts: Sequence[str], k: int = 10, family: str | Sequence[str] | None = None,
                    mode: str = "fused", depth: int | None = None) -> list[list[Hit]]:
        channels = self._channels(mode)
        fams = self.families(family)
        depth = max(depth or 0, 5 * k, 50)
        dense = [ch for ch in channels if ch != "lexical"]
        Q = self.text.encode(list(prompts)) if dense and self.text is not None else None
        dense_results, baseline = {}, {}
        for ch in dense:
            D, I = self.vectors[ch].search(Q, depth, fams)
            dense_results[ch] = (D, I)
            bg = self._background(ch)
            if bg is not None:
                baseline[ch] = np.median(Q @ bg.T, axis=1)
        out = []
        meta_ids = self.members.get("meta", ())   # the neighbours channel's weight depends on it (DEFAULT_FUSION)
        for qi, prompt in enumerate(prompts):
            raw: dict[int, dict[str, float]] = {}
            floors: dict[str, float] = {}
            for ch, (D, I) in dense_results.items():
                valid = I[qi] >= 0
                for d, i in zip(D[qi][valid], I[qi][valid]):
                    raw.setdefault(int(i), {})[ch] = float(d)
                floors[ch] = float(D[qi][valid].min()) if valid.any() else 0.0
            # a LoRA whose trigger word the prompt writes comes first (modes that read metadata; see `named`)
            named = set(self.named(prompt, fams)) if len(channels) > 1 and "lexical" in channels else set()
            for i in named:
                raw.setdefault(i, {})
            matched: dict[int, list[str]] = {}
            lexical_live = False
            if "lexical" in channels:
                lexical_live = any(s in self._vocab for s in stems(prompt))
                for h in self.lexical.search(prompt, family=fams):
                    raw.setdefault(h.id, {})["lexical"] = h.score
                    matched[h.id] = h.matched
            hits = []
            for i, scores in raw.items():
                e = self.entries.get(i)
                if e is None or e.family not in fams:
                    continue  # cannot happen with per-family indices; kept as a guard
                cal, weight_sum, total = {}, 0.0, 0.0
                for ch in channels:
                    if ch == "lexical":
                        if not lexical_live:
                            continue
                        s = scores.get("lexical", 0.0)
                    elif i in self.members[ch]:
                        s = scores.get(ch, floors[ch])
                    else:
                        continue  # this LoRA has nothing in this channel (e.g. no metadata)
                    c = self.calibrated(ch, s, baseline[ch][qi] if ch in baseline else None)
                    cal[ch] = c
                    w = self.fusion.get(ch, 1.0) if ch != "neighbours" or i in meta_ids else 1.0
                    weight_sum += w
                    total += w * c
                if not cal:
                    continue
                hits.append(Hit(i, e.name, e.family, total / max(weight_sum, 1e-9), cal, scores,
                                matched.get(i, []), e.trigger, self.model_of(i)))
            rank_key = (lambda h: (-h.raw.get(channels[0], -1.0), h.id)) if len(channels) == 1 else \
                (lambda h: (h.id not in named, -h.score, h.id))
            hits.sort(key=rank_key)
            if len(channels) > 1:   # modes that read metadata: one entry per model first, then other versions
                hits = self._versions_after(hits, named)
            out.append(hits[:k])
        return out

    def similar(self, name_or_id: int | str, k: int = 10, channel: str = "descriptor") -> list[Hit]:
        """LoRAs whose weights resemble this one's (same family only), itself excluded."""
        entry = self.catalog.get(name_or_id)
        vec = self.vectors[channel].reconstruct(entry.id)
        if vec is None:
            raise KeyError(f"{entry.name} is not in the {channel} index: refresh it")
        D, I = self.vectors[channel].search(vec[None], k + 1, [entry.family])
        hits = []
        for d, i in zip(D[0], I[0]):
            if i < 0 or int(i) == entry.id:
                continue
            e = self.entries[int(i)]
            hits.append(Hit(int(i), e.name, e.family, float(d), {channel: float(d)}, {channel: float(d)}, [],
                            e.trigger, self.model_of(int(i))))
        return hits[:k]

    def vector(self, channel: str, id_: int) -> np.ndarray | None:
        return self.vectors[channel].reconstruct(id_) if channel in self.vectors else None

    def __len__(self) -> int:
        return len(self.entries)


# ---------------------------------------------------------------------------------------------------- features
@dataclass
class Features:
    """What indexing computes from a chunk of files (picklable: worker processes return it)."""

    entries: list
    names: list[list[str]] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)
    init_prints: list[np.ndarray] = field(default_factory=list)   # `retrieval.shared_init` fingerprints, float16
    meta_vecs: np.ndarray | None = None
    weights: np.ndarray | None = None
    joint: np.ndarray | None = None
    encoded: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    files_read: int = 0
    from_catalog: int = 0

    def block_map(self, j: int) -> dict[str, np.ndarray]:
        return dict(zip(self.names[j], self.blocks[j]))


class _Worker:
    """Reads files and computes descriptor blocks and encoder vectors (in this process or a worker)."""

    def __init__(self, top_k: int, desc_config: DescriptorConfig, encoder=None):
        """`encoder`: a LoRAEncoder, the path of one saved (worker processes load it), or None."""
        self.top_k = top_k
        self.cfg = desc_config
        self.encoder = encoder
        if isinstance(encoder, (str, Path)):
            from .encoder import LoRAEncoder

            self.encoder = LoRAEncoder.load(encoder)

    def run(self, entries: Sequence, meta_vecs: np.ndarray | None, joint: bool, blocks: bool = True,
            stored: Sequence[tuple[list[str], np.ndarray]] | None = None) -> Features:
        """Features of `entries` from their files; `blocks=False`: the encoder's vectors only (the descriptor blocks
        and init prints come from the catalog: `stored`, per entry, as the catalog stores them)."""
        out = Features(entries=[], meta_vecs=None, files_read=len(entries))
        loaded, keep = [], []
        for j, e in enumerate(entries):
            try:
                modules, _, _ = read_factors(e.path, e.family)
            except Exception as err:  # a file that vanished or broke since the scan: skipped, and said so
                out.failed.append(f"{e.name}: {type(err).__name__}: {err}")
                continue
            loaded.append(modules)
            keep.append(j)
            out.entries.append(e)
        if meta_vecs is not None:
            out.meta_vecs = meta_vecs[keep] if keep else meta_vecs[:0]
        if not loaded:
            return out
        packed = pack_svds(loaded, self.top_k)
        if blocks:
            for found in raw_blocks_many(packed, self.cfg):
                names, stacked = stored_blocks(found, self.cfg)   # float16, as the catalog stores them
                out.names.append(names)
                out.blocks.append(stacked)
            out.init_prints = list(init_fingerprints(packed).astype(np.float16))
            stored = list(zip(out.names, out.blocks))
        elif stored is not None:
            stored = [stored[j] for j in keep]
        if self.encoder is not None:
            out.encoded = [j for j, e in enumerate(out.entries) if self.encoder.config.encodes(e.family)]
            if out.encoded:
                if len(out.encoded) == len(out.entries):
                    items = packed
                else:
                    per = packed.per_lora()
                    items = [per[j] for j in out.encoded]
                # the encoder's fixed sketches are the descriptor blocks just made or stored, when they fit
                sketches = [stored[j] for j in out.encoded] \
                    if stored is not None and self.encoder.config.takes_blocks_of(self.cfg) else None
                if joint and out.meta_vecs is not None:
                    present = [Metadata.of(out.entries[j]).has_text for j in out.encoded]
                    out.weights, out.joint = self.encoder.encode(items, out.meta_vecs[out.encoded], present,
                                                                 both=True, stored=sketches)
                else:
                    out.weights = self.encoder.encode(items, stored=sketches)
        return out


_WORKER: _Worker | None = None


def _init_worker(args, parent_pid: int) -> None:
    global _WORKER
    import torch

    from studio.library.catalog import exit_with_parent

    torch.set_num_threads(1)
    exit_with_parent(parent_pid)
    _WORKER = _Worker(*args)
    bulk_gc_thresholds()


def _run_worker(entries, meta_vecs, joint, blocks=True, stored=None) -> Features:
    return _WORKER.run(entries, meta_vecs, joint, blocks, stored)


def default_workers() -> int:
    """Worker processes for big (re)builds: LORA_STUDIO_INDEX_WORKERS, else min(2, CPUs)."""
    env = os.environ.get("LORA_STUDIO_INDEX_WORKERS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


class _FeaturizerPool:
    """``with _FeaturizerPool(lib, entries) as run: run(chunk)``: chunks of entries featurised in order; descriptor
    blocks and text vectors the catalog stored are read from it here, the other files are read in worker processes
    when there are many, with the main process embedding the other metadata texts meanwhile."""

    CHUNK = 128
    MIN_FILES_FOR_POOL = 384

    def __init__(self, lib: LibraryIndex, entries: Sequence, workers: int | None = None, encode: bool = True):
        self.lib = lib
        self.encode = encode
        enc = lib.encoder if encode else None
        self.args = (lib._top_k(), lib.descriptor.config, enc)
        self.tmp = None
        self.stored = lib._stored(entries)
        self.fingerprint = blocks_fingerprint(lib.descriptor.config)
        n_read = sum(e.id not in self.stored or (encode and lib._encodes(e)) for e in entries)
        self.workers = workers if workers is not None else getattr(lib, "workers", None) or default_workers()
        self.use_pool = self.workers > 1 and n_read >= self.MIN_FILES_FOR_POOL
        self.pool = None
        self.local = None
        self.seen: dict[str, np.ndarray] = {}
        self.text_fingerprint = None
        if lib.text is not None and hasattr(lib.catalog, "text_vectors"):
            self.text_fingerprint = lib.text.fingerprint()
        self.texts_from_catalog = 0

    def __enter__(self):
        if self.use_pool:
            from concurrent.futures import ProcessPoolExecutor

            args = self.args
            if args[2] is not None:
                # workers load the encoder from a file: sent as tensors through the spawn pipe, its 11 MB kept this
                # process blocked while each worker imported torch to unpickle them, one worker after the other
                self.tmp = tempfile.mkdtemp(prefix="lora_studio_encoder_")
                args = args[:2] + (str(args[2].save(Path(self.tmp) / "encoder.safetensors")),)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(args, os.getpid()))
        return self.run

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _meta(self, chunk) -> np.ndarray | None:
        """Metadata text vectors of a chunk: stored by the catalog scan for this embedder and text, or embedded here;
        a text already embedded in this run (a shared description) is reused."""
        text = self.lib.text
        if text is None or not self.encode:
            return None
        texts = [Metadata.of(e).text() for e in chunk]
        if self.text_fingerprint is not None:
            stored = self.lib.catalog.text_vectors([e.id for e in chunk], self.text_fingerprint)
            for e, t in zip(chunk, texts):
                if e.id in stored and stored[e.id][0] == text_key(t) and t not in self.seen:
                    self.seen[t] = stored[e.id][1]
                    self.texts_from_catalog += 1
        new = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if new:
            self.seen.update(zip(new, text.encode(new)))
        return np.stack([self.seen[t] for t in texts]) if texts else np.zeros((0, text.dim), np.float32)

    def _read(self, entries, meta_vecs, joint, blocks, stored=None):
        """Features of entries whose files must be read: a future (worker process) or a done value (here)."""
        if self.pool is not None:
            return self.pool.submit(_run_worker, entries, meta_vecs, joint, blocks, stored)
        if self.local is None:
            self.local = _Worker(*self.args)
        return self.local.run(entries, meta_vecs, joint, blocks, stored)

    def _split(self, chunk):
        """(stored blocks {id: StoredFeatures}, indices of the chunk's entries whose files must be read: those
        without stored blocks, and those the encoder encodes)."""
        ids = [e.id for e in chunk if e.id in self.stored]
        found = self.lib.catalog.stored_features(ids, self.fingerprint) if ids else {}
        found = {i: f for i, f in found.items() if f.tensor_hash == self.stored[i] and f.init_print is not None}
        return found, [j for j, e in enumerate(chunk) if e.id not in found or (self.encode and self.lib._encodes(e))]

    def run(self, entries: Sequence):
        """Yields (Features, None) per chunk, in order."""
        joint = "joint" in self.lib.vectors
        pending = []
        for start in range(0, len(entries), self.CHUNK):
            c = entries[start:start + self.CHUNK]
            meta = self._meta(c)
            found, to_read = self._split(c)
            read = None
            if to_read:   # keep a few chunks in flight; embed the next chunk's text while workers read files
                blocks = any(c[j].id not in found for j in to_read)   # else the encoder's vectors only
                stored = None if blocks else [(found[c[j].id].names, found[c[j].id].blocks) for j in to_read]
                read = self._read([c[j] for j in to_read], meta[to_read] if meta is not None else None, joint,
                                  blocks, stored)
            pending.append((c, meta, found, read))
            while len(pending) > (2 * self.workers if self.pool is not None else 0):
                yield _merge(*pending.pop(0)), None
        for item in pending:
            yield _merge(*item), None


def _merge(chunk, meta, found, read) -> Features:
    """One chunk's Features, in the chunk's order, from stored blocks (`found`) and the files read (`read`: Features
    of the other entries, or a future of them)."""
    if read is not None and not isinstance(read, Features):
        read = read.result()
    if not found and read is not None:
        return read   # every file read: already in the chunk's order
    out = Features(entries=[], meta_vecs=None, failed=list(read.failed) if read is not None else [],
                   files_read=read.files_read if read is not None else 0, from_catalog=len(found))
    from_file = {e.id: k for k, e in enumerate(read.entries)} if read is not None else {}
    was_encoded = set(read.encoded) if read is not None else set()
    keep = []
    for j, e in enumerate(chunk):
        k = from_file.get(e.id)
        if e.id in found:   # the file may have been read for the encoder alone
            names, blocks, init = found[e.id].names, found[e.id].blocks, found[e.id].init_print
        elif k is not None:
            names, blocks, init = read.names[k], read.blocks[k], read.init_prints[k]
        else:
            continue   # its file could not be read (said so in `failed`)
        if k is not None and k in was_encoded:   # rows of read.weights / read.joint, in the same order
            out.encoded.append(len(out.entries))
        out.entries.append(e)
        out.names.append(names)
        out.blocks.append(blocks)
        out.init_prints.append(init)
        keep.append(j)
    if meta is not None:
        out.meta_vecs = meta[keep] if keep else meta[:0]
    if out.encoded:
        out.weights, out.joint = read.weights, read.joint
    return out
