"""Style clustering of a LoRA library from its weights alone ("A LoRA is worth a thousand pictures").

    feats = style_features(loras)                  # (n, d) unit vectors, from ΔW only
    result = cluster_styles(feats)                 # number of clusters chosen by silhouette
    names = name_clusters(result.labels, words)    # from the members' metadata words, when there are any
    style_map(coords_2d(feats), result.labels, thumbnails, "map.png")

Features. Per adapted module, the output-side Gram matrix ΔW·ΔWᵀ (sketched through a fixed random projection,
so every LoRA of a family lands in the same coordinates) and the normalised spectrum. The output side is used
because LoRA's down matrix stays close to its random initialisation, so ΔW's input side mostly records the
training seed, while B (and so ΔW·ΔWᵀ = B·AAᵀ·Bᵀ) records what was learned; the Gram matrix is also
invariant to any change of basis inside the rank. Each module's block is normalised on its own (α, learning
rate, steps and rank drop out). Only the layers that carry style are used: `STYLE_LAYERS`, chosen from the
per-layer measurement that `bench/cluster.py --layers` writes into `bench/results/cluster.json`.

Shared initialisations. LoRAs trained from the same initialisation (one trainer's batch of runs with a fixed
seed and rank: the same random down matrices) share ΔW's row space, and so the same random input projection P
in ΔW·ΔWᵀ ≈ G·P·Gᵀ (G: what training pushed). On TinyWorld that shared part outweighs style: LoRAs group by
training run, not by style (`bench/cluster.py`, "init_groups"). `init_fingerprints` sketches each module's row
space (off-diagonal entries of R·V·Vᵀ·Rᵀ for a fixed random R: their inner products estimate the row-space
overlap ‖V₁ᵀV₂‖², near 0 for independent inits), `shared_init_groups` links LoRAs whose row spaces overlap,
and `features_from_blocks` takes out of each member what its group shares, as far as the group shows it
(`centre_groups`: the other members' mean, shrunk by how much more alike the members are than the library's LoRAs;
groups of `MIN_GROUP` or more, so a lone LoRA or two copies of one file are left as they are) before PCA. On
TinyWorld's library, where only one uploader's batch shares a seed, subtracting each group's plain mean instead
took style ARI from 0.59 to 0.44: a small group's mean is mostly its own members' styles.

Clustering. Up to a few hundred LoRAs: average-linkage (cosine) agglomerative clustering, cut at the number of
clusters with the best silhouette. Larger libraries are first reduced to `MICRO` k-means micro-clusters and
the tree is built on their centroids (10 000 LoRAs take seconds on 2 cores).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from studio.library.canonical import LoRA

from .descriptor import DescriptorConfig, attention_part, lora_svds_many, raw_blocks_many
from .shared_init import centre_groups, init_fingerprints, shared_init_groups

MICRO = 300          # micro-clusters above which k-means pre-reduces the library
SILHOUETTE_SAMPLE = 2500


def layer_group(name: str) -> str:
    """Coarse position of a module: ``down0`` … ``mid`` … ``up3`` (plus ``te`` for text-encoder modules)."""
    if not name.startswith("unet."):
        return "te"
    m = re.match(r"unet\.(down|up)_blocks\.(\d+)\.", name)
    if m:
        return f"{m.group(1)}{m.group(2)}"
    return "mid" if ".mid_block." in name else "other"


# Measured on TinyWorld's 42 style LoRAs (bench/cluster.py, "layers" in bench/results/cluster.json, and the
# per-module study written there as "style_vs_content"): the output side of the output projections (attn1/attn2
# to_out.0, attn2.to_v) in the highest-resolution attention blocks (down_blocks.0, up_blocks.2-3) separates style
# from the content a LoRA was trained on best; input sides record the training seed, cross-attention keys and
# the low-resolution blocks record content and the trigger binding.
STYLE_PROJECTIONS = ("attn1.to_out.0", "attn2.to_out.0", "attn2.to_v")
STYLE_BLOCKS = ("down0", "up2", "up3")


def STYLE_LAYERS(name: str) -> bool:  # noqa: N802 - a constant-like predicate
    return attention_part(name) in STYLE_PROJECTIONS and layer_group(name) in STYLE_BLOCKS


# ------------------------------------------------------------------------------------------------- features
FEATURE_CONFIG = DescriptorConfig(sketch=16, top_k=4, content_sketch=0)   # the 32-row content Gram did not help here


def _split_block(block: np.ndarray, cfg: DescriptorConfig) -> dict[str, np.ndarray]:
    d, k = cfg.sketch, cfg.top_k
    t = d * (d + 1) // 2
    return {"bilinear": block[: d * d], "out_gram": block[d * d: d * d + t],
            "in_gram": block[d * d + t: d * d + 2 * t], "spectrum": block[d * d + 2 * t: d * d + 2 * t + k]}


def weight_summaries(loras: Sequence[LoRA], cfg: DescriptorConfig = FEATURE_CONFIG
                     ) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Per LoRA, {module name: raw descriptor block} (see `retrieval.descriptor`), and the `init_fingerprints`
    of `loras`, from one SVD pass."""
    svds = lora_svds_many(list(loras), k=cfg.top_k)
    return raw_blocks_many(svds, cfg), init_fingerprints(loras, svds)


def features_from_blocks(blocks: Sequence[dict[str, np.ndarray]], layers: Callable[[str], bool] | None = STYLE_LAYERS,
                         parts: Sequence[str] = ("out_gram",), cfg: DescriptorConfig = FEATURE_CONFIG,
                         dim: int = 32, groups: np.ndarray | None = None) -> np.ndarray:
    """(n, ≤dim) unit vectors: the chosen parts of the chosen modules' blocks, laid out over the union of
    module names, centred within shared-initialisation `groups` (see `shared_init_groups`; None: no centring),
    PCA-reduced (on the library itself) and L2-normalised."""
    names = sorted({m for b in blocks for m in b if layers is None or layers(m)})
    if not names and layers is STYLE_LAYERS:   # LoRAs that skip those blocks (SDXL's layout, partial LoRAs):
        names = sorted({m for b in blocks for m in b if attention_part(m) is not None})   # any attention
    if not names:
        raise ValueError("no LoRA module matches the style layers; is this a LoRA of an attention model?")
    rows = []
    for b in blocks:
        parts_of = [_split_block(b[m], cfg) if m in b else None for m in names]
        vec = []
        for p in parts_of:
            for part in parts:
                if p is None:
                    width = len(_split_block(np.zeros(cfg.block, dtype=np.float32), cfg)[part])
                    vec.append(np.zeros(width, dtype=np.float32))
                else:
                    x = p[part]
                    vec.append(x / max(float(np.linalg.norm(x)), 1e-12))
        rows.append(np.concatenate(vec))
    X = np.stack(rows).astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)
    X = centre_groups(X, groups)
    X -= X.mean(axis=0)
    k = min(dim, max(1, X.shape[0] - 1), X.shape[1])
    if X.shape[0] > 2:
        _, _, vt = np.linalg.svd(X, full_matrices=False)
        X = X @ vt[:k].T
    return (X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def style_features(loras: Sequence[LoRA], layers: Callable[[str], bool] | None = STYLE_LAYERS,
                   dim: int = 32) -> np.ndarray:
    """Weight-only style features of `loras` (all of one base family): (n, ≤dim), unit rows, with what LoRAs
    trained from one initialisation share taken out."""
    blocks, fingerprints = weight_summaries(loras)
    return features_from_blocks(blocks, layers=layers, dim=dim, groups=shared_init_groups(fingerprints))


# ------------------------------------------------------------------------------------------------ clustering
@dataclass
class StyleClusters:
    labels: np.ndarray                  # (n,) cluster id per LoRA, 0..k-1, largest cluster first
    k: int
    silhouette: float
    silhouettes: dict[int, float] = field(default_factory=dict)   # k -> silhouette of that cut
    names: list[str] = field(default_factory=list)                # one per cluster, once named


def _cosine_distances(X: np.ndarray) -> np.ndarray:
    D = 1.0 - X @ X.T
    np.fill_diagonal(D, 0.0)
    return np.clip(D, 0.0, 2.0)


def _silhouette(D: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2 or len(set(labels.tolist())) >= len(labels):
        return -1.0
    return float(silhouette_score(D, labels, metric="precomputed"))


def cluster_styles(X: np.ndarray, k: int | None = None, max_k: int | None = None, seed: int = 0) -> StyleClusters:
    """Cluster unit feature rows `X`; `k=None` picks the number of clusters with the best silhouette."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(X)
    if n < 3:
        return StyleClusters(np.zeros(n, dtype=int), 1, 0.0)
    if n > MICRO:  # k-means micro-clusters, then the tree on their centroids
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=MICRO, n_init=1, max_iter=50, random_state=seed).fit(X)
        assign = km.labels_
        centres = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True).clip(1e-12)
    else:
        assign, centres = np.arange(n), X
    tree = linkage(squareform(_cosine_distances(centres.astype(np.float64)), checks=False), method="average")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, SILHOUETTE_SAMPLE, replace=False)) if n > SILHOUETTE_SAMPLE else np.arange(n)
    D = _cosine_distances(X[sample].astype(np.float64))
    max_k = min(max_k or max(2, int(2 * math.sqrt(n))), len(centres) - 1, n - 1)
    scores = {}
    candidates = [k] if k else range(2, max_k + 1)
    cuts = {}
    for kk in candidates:
        labels = fcluster(tree, kk, criterion="maxclust")[assign] - 1
        cuts[kk] = labels
        scores[kk] = _silhouette(D, labels[sample])
    best = k or max(scores, key=lambda kk: (round(scores[kk], 4), -kk))
    labels = cuts[best]
    order = [c for c, _ in Counter(labels.tolist()).most_common()]   # relabel: largest cluster first
    labels = np.array([order.index(c) for c in labels])
    return StyleClusters(labels, len(order), scores[best], scores)


# ------------------------------------------------------------------------------------------------ naming
_STOP = {"lora", "the", "and", "with", "for", "style", "a", "an", "of", "in", "on", "by", "to", "it", "its",
         "model", "trained", "tinyworld", "sd15", "sdxl", "version", "v1", "v2", "p"}


def metadata_words(texts: Sequence[str]) -> list[str]:
    """Lower-case words of a LoRA's metadata texts (trigger words, tags, title, description)."""
    words = []
    for t in texts:
        words += [w for w in re.findall(r"[a-z][a-z0-9_\-]{1,30}", (t or "").lower()) if w not in _STOP]
    return words


def name_clusters(labels: np.ndarray, words: Sequence[Sequence[str]], top: int = 2) -> list[str]:
    """A name per cluster from its members' metadata words (tf-idf over clusters); ``cluster N`` if none."""
    k = int(labels.max()) + 1 if len(labels) else 0
    per_cluster = [Counter() for _ in range(k)]
    for lab, ws in zip(labels, words):
        per_cluster[int(lab)].update(set(ws))
    df = Counter(w for c in per_cluster for w in c)
    names = []
    for i, c in enumerate(per_cluster):
        size = int((labels == i).sum())
        scored = sorted(c, key=lambda w: (-(c[w] / size) * math.log(1 + k / df[w]), w))
        good = [w for w in scored if c[w] / size >= 0.5][:top]
        names.append(" / ".join(good) if good else f"cluster {i}")
    return names


# ------------------------------------------------------------------------------------------------ the map
def coords_2d(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D map coordinates: t-SNE (cosine) up to 2 000 LoRAs, PCA beyond; scaled to [0, 1]."""
    n = len(X)
    if n < 4:
        Y = np.c_[np.arange(n, dtype=float), np.zeros(n)]
    elif n <= 2000:
        from sklearn.manifold import TSNE

        Y = TSNE(n_components=2, metric="cosine", init="pca", perplexity=min(30.0, (n - 1) / 3),
                 random_state=seed).fit_transform(X.astype(np.float64))
    else:
        Xc = X - X.mean(axis=0)
        _, _, vt = np.linalg.svd(Xc, full_matrices=False)
        Y = Xc @ vt[:2].T
    Y = Y - Y.min(axis=0)
    return Y / np.where(Y.max(axis=0) > 0, Y.max(axis=0), 1.0)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0),
           (0, 128, 128), (128, 128, 0), (70, 240, 240), (240, 50, 230)]


def cluster_colour(i: int) -> tuple[int, int, int]:
    if i < len(PALETTE):
        return PALETTE[i]
    h = (i * 0.618034) % 1.0
    import colorsys

    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.65, 0.85))


def style_map(coords: np.ndarray, labels: np.ndarray, thumbnails: Sequence, out: str, names: Sequence[str] = (),
              cluster_names: Sequence[str] = (), size: int = 1100, thumb: int = 40, title: str = "") -> str:
    """Draw the map: each LoRA its thumbnail (PIL image or None) framed in its cluster's colour, and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    legend_w = 260
    canvas = Image.new("RGB", (size + legend_w, size), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    pad = thumb
    span = size - 2 * pad
    for (x, y), lab, img in sorted(zip(coords.tolist(), labels.tolist(), thumbnails), key=lambda r: r[1]):
        cx, cy = pad + x * span, pad + (1 - y) * span
        colour = cluster_colour(int(lab))
        box = (int(cx - thumb / 2 - 3), int(cy - thumb / 2 - 3), int(cx + thumb / 2 + 3), int(cy + thumb / 2 + 3))
        draw.rectangle(box, fill=colour)
        if img is not None:
            canvas.paste(img.convert("RGB").resize((thumb, thumb)), (box[0] + 3, box[1] + 3))
        else:
            draw.ellipse((box[0] + 8, box[1] + 8, box[2] - 8, box[3] - 8), fill=(255, 255, 255))
    if title:
        draw.text((10, 8), title, fill=(0, 0, 0), font=font)
    k = int(labels.max()) + 1 if len(labels) else 0
    y = 20
    for i in range(k):
        n_i = int((labels == i).sum())
        label = cluster_names[i] if i < len(cluster_names) else f"cluster {i}"
        draw.rectangle((size + 10, y, size + 24, y + 14), fill=cluster_colour(i))
        draw.text((size + 30, y + 1), f"{label} ({n_i})"[:36], fill=(0, 0, 0), font=font)
        y += 20
        if y > size - 20:
            draw.text((size + 30, y), f"... {k - i - 1} more", fill=(0, 0, 0), font=font)
            break
    canvas.save(out)
    return str(out)


# ------------------------------------------------------------------------------------------------ a library
@dataclass
class LibraryStyles:
    """A clustered library: per LoRA its name, path, cluster and map position; per cluster its name."""
    names: list[str]
    paths: list[str]
    clusters: StyleClusters
    coords: np.ndarray
    family: str
    map_png: str | None = None
    skipped: list[str] = field(default_factory=list)   # LoRAs of other families, or unreadable

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, lab in zip(self.names, self.clusters.labels.tolist()):
            out.setdefault(self.clusters.names[lab], []).append(name)
        return out

    def to_dict(self) -> dict:
        return {"family": self.family, "k": self.clusters.k, "silhouette": round(self.clusters.silhouette, 4),
                "clusters": [{"name": n, "members": m} for n, m in self.groups().items()],
                "loras": [{"name": n, "path": p, "cluster": int(c), "x": float(x), "y": float(y)}
                          for n, p, c, (x, y) in zip(self.names, self.paths, self.clusters.labels.tolist(),
                                                     self.coords.tolist())],
                "map_png": self.map_png, "skipped": self.skipped}


def cluster_library(entries: Sequence, load: Callable, family: str, out_png: str | None = None,
                    thumbnail: Callable | None = None, k: int | None = None, progress: bool = True) -> LibraryStyles:
    """Cluster the catalogued LoRAs (`studio.library.catalog.Entry`) of one base `family` by style.

    `load(entry) -> LoRA`; `thumbnail(entry) -> PIL image | None` gives each point of the map its picture."""
    from tqdm import tqdm

    chosen, loras, skipped = [], [], []
    for e in tqdm(entries, desc="read LoRAs", disable=not progress):
        if e.family not in (family, None, "unknown"):
            skipped.append(f"{e.name}: for {e.family}, not {family}")
            continue
        try:
            loras.append(load(e))
            chosen.append(e)
        except Exception as err:  # a file that changed since it was indexed: skip it, say why
            skipped.append(f"{e.name}: {err}")
    if not chosen:
        raise ValueError(f"no {family} LoRA in the library to cluster")
    X = style_features(loras)
    result = cluster_styles(X, k=k)
    words = [metadata_words([*e.trigger_words, *e.tags, e.metadata.get("modelspec.title", ""),
                             e.metadata.get("ss_output_name", "")]) for e in chosen]
    result.names = name_clusters(result.labels, words)
    coords = coords_2d(X)
    map_png = None
    if out_png:
        thumbs = [thumbnail(e) if thumbnail else None for e in tqdm(chosen, desc="thumbnails", disable=not progress)]
        map_png = style_map(coords, result.labels, thumbs, out_png, cluster_names=result.names,
                            title=f"{len(chosen)} {family} LoRAs, {result.k} style clusters (from weights alone)")
    return LibraryStyles([e.name for e in chosen], [str(e.path) for e in chosen], result, coords, family,
                         map_png, skipped)
