"""Vector index over LoRA ids: FAISS, one sub-index per base-model family (the family is a hard filter).

Each family's vectors live in their own index, so a search for ``family="sdxl"`` cannot return an SD1.5 LoRA,
whatever its score. Below `ivf_threshold` vectors a family uses exact search (``IndexIDMap2(IndexFlatIP)``);
crossing it converts that family to ``IndexIVFScalarQuantizer`` (inner product) with ``nlist`` ≈ 8·√n (at 1 M
clustered 128-d vectors, 8 000 lists reach recall@10 0.988 at nprobe 32 in 0.29 ms, where 4 000 lists need nprobe
128 and 1.1 ms for 0.98) and ``nprobe`` tuned on the stored vectors until recall@10 against exact search reaches the target. Codes are fp16
by default: measured on 200 000 clustered 128-d vectors, 8-bit codes (``codec="sq8"``, half the memory) top out
at recall@10 0.98 even when every list is scanned (their rounding reorders close neighbours), while fp16 codes
reach 0.984 at nprobe 32 in the same time (bench/retrieval.py, "scale").
Vectors are L2-normalised, so inner product is cosine similarity. Ids are int64 (catalog ids).

``save``/``load`` write one file holding every family's index (FAISS serialisation) plus a JSON header.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

_MAGIC = b"LSVI0001"


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


@dataclass
class FamilyStats:
    kind: str       # "flat" or "ivf"
    n: int
    nlist: int = 0
    nprobe: int = 0


def _flat_vectors(index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) stored in an IndexIDMap2(IndexFlatIP)."""
    inner = faiss.downcast_index(index.index)
    n, d = inner.ntotal, inner.d
    xb = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d).copy() if n else np.zeros((0, d), np.float32)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return ids, xb


class VectorIndex:
    """Per-family FAISS indices of one kind of vector (all of dimension `dim`)."""

    CODECS = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}

    def __init__(self, dim: int, ivf_threshold: int = 50_000, target_recall: float = 0.98,
                 nlist: int | None = None, codec: str = "fp16"):
        if codec not in self.CODECS:
            raise ValueError(f"codec must be one of {sorted(self.CODECS)}, got {codec!r}")
        self.codec = codec
        self.dim = int(dim)
        self.ivf_threshold = int(ivf_threshold)
        self.target_recall = float(target_recall)
        self.nlist = nlist
        self._indices: dict[str, faiss.Index] = {}
        self._nprobe: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ info
    @property
    def families(self) -> list[str]:
        return sorted(self._indices)

    def __len__(self) -> int:
        return sum(ix.ntotal for ix in self._indices.values())

    def count(self, family: str) -> int:
        ix = self._indices.get(family)
        return 0 if ix is None else ix.ntotal

    def stats(self) -> dict[str, FamilyStats]:
        out = {}
        for family, ix in self._indices.items():
            if self._is_ivf(ix):
                ivf = faiss.extract_index_ivf(ix)
                out[family] = FamilyStats("ivf", ix.ntotal, ivf.nlist, self._nprobe.get(family, ivf.nprobe))
            else:
                out[family] = FamilyStats("flat", ix.ntotal)
        return out

    @staticmethod
    def _is_ivf(ix) -> bool:
        return isinstance(faiss.downcast_index(ix), faiss.IndexIVF)

    def _flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def ids(self, family: str | None = None) -> np.ndarray:
        """Stored ids (of one family, or all)."""
        out = []
        for fam, ix in self._indices.items():
            if family is not None and fam != family:
                continue
            if self._is_ivf(ix):
                ivf = faiss.extract_index_ivf(ix)
                invlists = ivf.invlists
                for lst in range(ivf.nlist):
                    size = invlists.list_size(lst)
                    if size:
                        out.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
            else:
                out.append(faiss.vector_to_array(ix.id_map).astype(np.int64))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------------------------------------ edit
    def add(self, ids: Sequence[int], vectors: np.ndarray, family: str | Sequence[str]) -> None:
        """Add vectors under `ids`; an id already present (in any family) is replaced."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = normalise(vectors)
        if x.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} vectors of size {self.dim}, got {x.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        fams = [family] * len(ids) if isinstance(family, str) else list(family)
        self.remove(ids)
        for fam in sorted(set(fams)):
            sel = np.array([f == fam for f in fams])
            ix = self._indices.get(fam)
            if ix is None:
                ix = self._indices[fam] = self._flat()
            ix.add_with_ids(x[sel], ids[sel])
            if not self._is_ivf(ix) and ix.ntotal > self.ivf_threshold:
                self._to_ivf(fam)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove ids wherever they are; returns how many were removed."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return 0
        removed = 0
        for fam in list(self._indices):
            ix = self._indices[fam]
            removed += int(ix.remove_ids(faiss.IDSelectorBatch(ids)))
            if ix.ntotal == 0:
                del self._indices[fam]
                self._nprobe.pop(fam, None)
        return removed

    def clear(self) -> None:
        self._indices.clear()
        self._nprobe.clear()

    # ------------------------------------------------------------------------------------------------ IVF
    def _to_ivf(self, family: str) -> None:
        ids, xb = _flat_vectors(self._indices[family])
        self._indices[family] = self.build_ivf(xb, ids)
        self._nprobe[family] = self.tune_nprobe(family, xb, ids)

    def build_ivf(self, xb: np.ndarray, ids: np.ndarray, nlist: int | None = None, seed: int = 0) -> faiss.Index:
        n = len(xb)
        if not (nlist or self.nlist):  # ~8·√n lists, each with >= 39 training points
            nlist = int(min(65536, max(16, min(8 * math.sqrt(n), n // 39))))
        nlist = nlist or self.nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, self.CODECS[self.codec],
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        ivf.cp.niter = 10
        rng = np.random.default_rng(seed)
        train = xb if n <= 48 * nlist else xb[rng.choice(n, 48 * nlist, replace=False)]
        ivf.train(train)
        ivf.add_with_ids(xb, ids)
        ivf.nprobe = min(16, nlist)
        return ivf

    def tune_nprobe(self, family: str, xb: np.ndarray, ids: np.ndarray, queries: np.ndarray | None = None,
                    n_queries: int = 200, k: int = 10, noise: float = 1.0, seed: int = 0) -> int:
        """Smallest nprobe (doubling, then bisection) whose recall@k against exact search over `xb` reaches
        `target_recall`.

        `queries` default to stored vectors plus Gaussian noise of relative size `noise`: near, not on, the data.
        Sets and returns the family's nprobe.
        """
        ix = self._indices[family]
        ivf = faiss.extract_index_ivf(ix)
        if queries is None:
            rng = np.random.default_rng(seed)
            pick = rng.choice(len(xb), min(n_queries, len(xb)), replace=False)
            queries = xb[pick] + noise * rng.standard_normal((len(pick), self.dim)).astype(np.float32) / math.sqrt(
                self.dim)
        q = normalise(queries)
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(np.ascontiguousarray(xb, dtype=np.float32))
        _, gt = exact.search(q, k)
        gt_ids = ids[gt]
        def good(nprobe: int) -> bool:
            ivf.nprobe = nprobe
            _, found = ix.search(q, k)
            return recall_at_k(found, gt_ids) >= self.target_recall

        lo, nprobe = 0, 1   # doubling until the target is reached, then bisection down to ~1/16 of nprobe
        while not good(nprobe) and nprobe < ivf.nlist:
            lo, nprobe = nprobe, min(ivf.nlist, nprobe * 2)
        while nprobe - lo > max(1, nprobe // 16):
            mid = (lo + nprobe) // 2
            if good(mid):
                nprobe = mid
            else:
                lo = mid
        ivf.nprobe = nprobe
        self._nprobe[family] = nprobe
        return nprobe

    def set_nprobe(self, family: str, nprobe: int) -> None:
        self._nprobe[family] = int(nprobe)
        faiss.extract_index_ivf(self._indices[family]).nprobe = int(nprobe)

    # ------------------------------------------------------------------------------------------------ search
    def search(self, vectors: np.ndarray, k: int, family: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first, from the given family (or families) only.

        Missing results are id -1 with score -inf. Families are searched separately and merged, so the
        filter is exact: no vector of another family can appear.
        """
        q = normalise(vectors)
        fams = [family] if isinstance(family, str) else list(family)
        all_d, all_i = [], []
        for fam in fams:
            ix = self._indices.get(fam)
            if ix is None or ix.ntotal == 0:
                continue
            if fam in self._nprobe:
                faiss.extract_index_ivf(ix).nprobe = self._nprobe[fam]
            d, i = ix.search(q, min(k, ix.ntotal))
            all_d.append(d)
            all_i.append(i)
        out_d = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        if not all_d:
            return out_d, out_i
        d = np.concatenate(all_d, axis=1)
        i = np.concatenate(all_i, axis=1)
        d = np.where(i < 0, -np.inf, d)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        m = order.shape[1]
        out_d[:, :m] = np.take_along_axis(d, order, axis=1)
        out_i[:, :m] = np.take_along_axis(i, order, axis=1)
        out_i[~np.isfinite(out_d)] = -1
        return out_d, out_i

    def reconstruct(self, id_: int) -> np.ndarray | None:
        """The stored vector of an id (exact for flat families, decoded from its codes for IVF), or None."""
        for ix in self._indices.values():
            if self._is_ivf(ix):
                ivf = faiss.extract_index_ivf(ix)
                if ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
                try:
                    return ivf.reconstruct(int(id_))
                except RuntimeError:
                    continue
            else:
                try:
                    return ix.reconstruct(int(id_))
                except RuntimeError:
                    continue
        return None

    # ------------------------------------------------------------------------------------------------ disk
    def to_bytes(self) -> bytes:
        header = {"dim": self.dim, "ivf_threshold": self.ivf_threshold, "target_recall": self.target_recall,
                  "nlist": self.nlist, "codec": self.codec, "nprobe": self._nprobe, "families": []}
        blobs = []
        for fam in self.families:
            blob = faiss.serialize_index(self._indices[fam]).tobytes()
            header["families"].append({"family": fam, "bytes": len(blob)})
            blobs.append(blob)
        head = json.dumps(header).encode()
        return _MAGIC + len(head).to_bytes(8, "little") + head + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> VectorIndex:
        if data[:8] != _MAGIC:
            raise ValueError("not a LoRA Studio vector index")
        n = int.from_bytes(data[8:16], "little")
        header = json.loads(data[16:16 + n].decode())
        self = cls(header["dim"], header["ivf_threshold"], header["target_recall"], header["nlist"],
                   header.get("codec", "sq8"))  # files written before the codec choice hold 8-bit codes
        offset = 16 + n
        for item in header["families"]:
            blob = np.frombuffer(data[offset:offset + item["bytes"]], dtype=np.uint8)
            offset += item["bytes"]
            self._indices[item["family"]] = faiss.deserialize_index(blob)
        for fam, nprobe in header["nprobe"].items():
            if fam in self._indices:
                self.set_nprobe(fam, nprobe)
        return self

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        return cls.from_bytes(Path(path).read_bytes())


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids; -1 ignored)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = set(int(x) for x in t if x >= 0)
        hits += len(t & set(int(x) for x in f if x >= 0))
        total += len(t)
    return hits / max(total, 1)
