"""Style clustering of TinyWorld's LoRA library from weights alone, against an image-embedding baseline.

    python bench/cluster.py            # writes bench/results/cluster.json and docs/style_map.png

Ground truth (read here only, never by the product): `assets/loras_labels.json`.
- `styles`: every style LoRA (headline, community variants, and style LoRAs trained on one narrow content
  each: red circles, blue squares, …), labelled by style: the same style trained on different content, ranks
  and seeds must land together.
- `library`: every LoRA, labelled by concept.
Weights: `retrieval.clustering` (output-side Gram sketches of the style layers, centred within groups of LoRAs
trained from one initialisation, silhouette-chosen number of clusters). Image baseline: `--images` samples per
LoRA generated with the LoRA alone (same prompts and seeds for every LoRA, the concept's trigger word in the prompt), embedded with the judge CNN's pooled features (a network
trained on TinyWorld renders: a stronger image encoder for this world than a generic CLIP/DINO would be), mean
per LoRA, then the same clustering. Both are reported with the number of clusters chosen automatically and at
the true number. `layers`: clustering quality (ARI at the true number of clusters) of each layer group and
attention projection on its own: the measurement behind `retrieval.clustering.STYLE_LAYERS`.
`seconds_10k`: clustering 10 000 synthetic 32-d descriptors (40 styles) on this machine, shared-initialisation
grouping of their synthetic 512-d fingerprints included (`seconds_10k_init_groups`).
`style_shown`: how often the judge sees each style LoRA's own style in its image-baseline samples, by kind of
LoRA (headline, community variant, trained on one narrow content): a family whose LoRAs never learned their style
cannot be recovered from their weights either. `weights_styles_shown`: the weights' clustering of all style
LoRAs (the `styles` figure), scored only on the LoRAs whose samples show their style at least half the time.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from retrieval.clustering import (STYLE_LAYERS, cluster_styles, coords_2d, features_from_blocks,  # noqa: E402
                                  layer_group, metadata_words, name_clusters, style_map, weight_summaries)
from retrieval.descriptor import attention_part  # noqa: E402
from retrieval.shared_init import MIN_GROUP, centre_groups, shared_init_groups  # noqa: E402
from studio.library.formats import read_lora  # noqa: E402


def scores(truth, labels) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": round(float(adjusted_rand_score(truth, labels)), 4),
            "nmi": round(float(normalized_mutual_info_score(truth, labels)), 4)}


def evaluate(X, truth) -> dict:
    auto = cluster_styles(X)
    fixed = cluster_styles(X, k=len(set(truth)))
    return {**scores(truth, auto.labels), "k": auto.k, "true_k": len(set(truth)),
            "at_true_k": scores(truth, fixed.labels)}


def unit_pca(E: np.ndarray, dim: int = 32) -> np.ndarray:
    E = E / np.linalg.norm(E, axis=1, keepdims=True).clip(1e-12)
    E = E - E.mean(axis=0)
    _, _, vt = np.linalg.svd(E, full_matrices=False)
    E = E @ vt[: min(dim, len(E) - 1)].T
    return E / np.linalg.norm(E, axis=1, keepdims=True).clip(1e-12)


def style_vs_content(loras, concept, content, top: int = 12) -> list[dict]:
    """Per module, among style LoRAs trained on one narrow content each: mean cosine of the output-side Gram
    ΔW·ΔWᵀ between two LoRAs of the same style (different content) minus that of two LoRAs of different styles
    on the same content. Positive: the module carries style more than content. The best `top` modules."""
    idx = [i for i, c in enumerate(content) if c]
    names = sorted(set.intersection(*[set(loras[i].modules) for i in idx]))
    rows = []
    for name in names:
        G = []
        for i in idx:
            d = loras[i].modules[name].lowrank_delta().float()
            d = d.reshape(d.shape[0], -1)
            g = d @ d.T
            G.append((g / g.norm().clamp_min(1e-12)).flatten().numpy())
        G = np.stack(G)
        S = G @ G.T
        pairs = [(a, b) for a in range(len(idx)) for b in range(len(idx)) if a != b]
        same_style = [S[a, b] for a, b in pairs if concept[idx[a]] == concept[idx[b]]]
        same_content = [S[a, b] for a, b in pairs if concept[idx[a]] != concept[idx[b]]
                        and content[idx[a]] == content[idx[b]]]
        rows.append({"module": name, "margin": round(float(np.mean(same_style) - np.mean(same_content)), 4),
                     "same_style": round(float(np.mean(same_style)), 4),
                     "same_content": round(float(np.mean(same_content)), 4)})
    return sorted(rows, key=lambda r: -r["margin"])[:top]


def lora_images(paths, concepts, n_images: int, steps: int):
    """Per LoRA, `n_images` samples with the LoRA alone: the same base compositions and seeds for all."""
    from tqdm import tqdm

    from studio.api import Studio
    from studio.tinyworld.catalog import caption, sample_base
    from studio.tinyworld.train_lora import with_concept

    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="cluster_bench_lib_"))   # one library holding every labelled LoRA
    links = []
    for path in paths:
        link = folder / f"{path.parent.name}__{path.name}"
        link.symlink_to(path.resolve())
        links.append(link)
    studio = Studio(library=folder)
    bases = [sample_base(random.Random(900 + i)) for i in range(n_images)]
    out = []
    for path, concept in tqdm(list(zip(links, concepts)), desc="images per LoRA"):
        prompts = [caption(with_concept(type(b)(**b.to_dict()), concept), random.Random(i)) for i, b in enumerate(bases)]
        seeds = [4000 + i for i in range(n_images)]
        out.append([r.image for r in studio.generate_many(prompts, seeds, steps=steps, loras=[(path.stem, 1.0)],
                                                           progress=False)])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", default=str(ROOT / "assets" / "loras_labels.json"))
    ap.add_argument("--images", type=int, default=4, help="samples per LoRA for the image baseline")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    ap.add_argument("--map", default=str(ROOT / "docs" / "style_map.png"))
    ap.add_argument("--no-images", action="store_true", help="skip the image baseline (quick layer study)")
    args = ap.parse_args(argv)

    labels = json.loads(Path(args.labels).read_text())
    rels = sorted(r for r in labels if (ROOT / r).exists())
    paths = [ROOT / r for r in rels]
    concept = [labels[r]["concept"] for r in rels]
    category = [labels[r]["category"] for r in rels]
    t0 = time.time()
    loras = [read_lora(p) for p in paths]
    blocks, fingerprints = weight_summaries(loras)
    seconds_per_lora = (time.time() - t0) / len(loras)
    sets = {"styles": [i for i, c in enumerate(category) if c == "style"], "library": list(range(len(rels)))}
    init_groups = {name: shared_init_groups(fingerprints[idx]) for name, idx in sets.items()}
    result = {"machine": machine(), "n_loras": len(rels), "sets": {k: len(v) for k, v in sets.items()},
              "feature_seconds_per_lora": round(seconds_per_lora, 4)}
    # shared initialisations found from the weights, against the truth (same seed and rank = same init)
    from sklearn.metrics import adjusted_rand_score

    result["init_groups"] = {}
    for name, idx in sets.items():
        g = init_groups[name]
        ids, counts = np.unique(g, return_counts=True)
        runs = [f"{labels[rels[i]]['seed']}_{labels[rels[i]]['rank']}" for i in idx]
        result["init_groups"][name] = {"groups": int(len(ids)), "centred_groups": int((counts >= MIN_GROUP).sum()),
                                       "centred_loras": int(counts[counts >= MIN_GROUP].sum()),
                                       "ari_vs_seed_and_rank": round(float(adjusted_rand_score(runs, g)), 4)}
    print("shared initialisations", json.dumps(result["init_groups"]))

    # which layers carry style: each layer group and each attention projection alone, at the true k
    # (features centred within shared initialisations, as the product does; "STYLE_LAYERS, not centred": before)
    groups = sorted({layer_group(m) for b in blocks for m in b})
    parts = sorted({attention_part(m) for b in blocks for m in b} - {None})
    layer_table = {}
    for name, pred in ([("all", None), ("STYLE_LAYERS", STYLE_LAYERS), ("STYLE_LAYERS, not centred", STYLE_LAYERS)]
                       + [(f"block:{g}", (lambda m, g=g: layer_group(m) == g)) for g in groups]
                       + [(f"proj:{p}", (lambda m, p=p: attention_part(m) == p)) for p in parts]):
        row = {}
        for set_name, idx in sets.items():
            truth = [concept[i] for i in idx]
            centred = None if name.endswith("not centred") else init_groups[set_name]
            X = features_from_blocks([blocks[i] for i in idx], layers=pred, groups=centred)
            row[set_name] = scores(truth, cluster_styles(X, k=len(set(truth))).labels)["ari"]
        layer_table[name] = row
        print(f"{name:28s} styles ARI {row['styles']:.3f}  library ARI {row['library']:.3f}")
    for feat in (("out_gram",), ("out_gram", "spectrum"), ("in_gram",), ("bilinear",)):
        row = {}
        for set_name, idx in sets.items():
            truth = [concept[i] for i in idx]
            X = features_from_blocks([blocks[i] for i in idx], layers=STYLE_LAYERS, parts=feat,
                                     groups=init_groups[set_name])
            row[set_name] = scores(truth, cluster_styles(X, k=len(set(truth))).labels)["ari"]
        layer_table["parts:" + "+".join(feat)] = row
        print(f"{'parts:' + '+'.join(feat):28s} styles ARI {row['styles']:.3f}  library ARI {row['library']:.3f}")
    result["layers"] = layer_table
    content = [json.dumps(labels[r].get("content"), sort_keys=True) if labels[r].get("content") else None for r in rels]
    result["style_vs_content"] = style_vs_content(loras, concept, content)
    print("style vs content, best modules:", [(r["module"], r["margin"]) for r in result["style_vs_content"][:5]])

    # weights, the product's path
    feats = {}
    result["weights_by_set"] = {}
    for set_name, idx in sets.items():
        X = features_from_blocks([blocks[i] for i in idx], groups=init_groups[set_name])
        feats[set_name] = X
        result["weights_by_set"][set_name] = evaluate(X, [concept[i] for i in idx])
    result["weights"] = {k: result["weights_by_set"]["styles"][k] for k in ("ari", "nmi", "k")}
    print("weights", json.dumps(result["weights_by_set"]))

    # image baseline
    images = None
    if not args.no_images:
        images = lora_images(paths, concept, args.images, args.steps)
        from studio.tinyworld.judge import JudgeModel

        judge = JudgeModel()
        E = np.stack([judge.embed(imgs).mean(axis=0) for imgs in images])
        result["image_baseline_by_set"] = {}
        for set_name, idx in sets.items():
            result["image_baseline_by_set"][set_name] = evaluate(unit_pca(E[idx]), [concept[i] for i in idx])
        result["image_baseline"] = {k: result["image_baseline_by_set"]["styles"][k] for k in ("ari", "nmi", "k")}
        shown: dict[str, list[float]] = {}
        rate = {}
        for i in sets["styles"]:
            kind = labels[rels[i]].get("kind", "unknown")
            rate[i] = float(np.mean([p["style"] == concept[i] for p in judge.predict(images[i])]))
            shown.setdefault(kind, []).append(rate[i])
        result["style_shown"] = {kind: {"mean": round(float(np.mean(v)), 3), "loras": len(v),
                                        "at_least_half": int(sum(x >= 0.5 for x in v))} for kind, v in shown.items()}
        print("style shown in its own samples", json.dumps(result["style_shown"]))
        # the weights' clustering of every style LoRA (as above), scored on those whose samples show their style
        strong = [j for j, i in enumerate(sets["styles"]) if rate[i] >= 0.5]
        truth = [concept[sets["styles"][j]] for j in strong]
        auto = cluster_styles(feats["styles"])
        fixed = cluster_styles(feats["styles"], k=len(set(concept[i] for i in sets["styles"])))
        result["weights_styles_shown"] = {"loras": len(strong), "styles": len(set(truth)),
                                          **scores(truth, auto.labels[strong]),
                                          "at_true_k": scores(truth, fixed.labels[strong])}
        print("weights, style LoRAs that show their style", json.dumps(result["weights_styles_shown"]))
        print("images", json.dumps(result["image_baseline_by_set"]))

    # 10 000 LoRAs: synthetic 32-d descriptors around 40 style centres
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    syn = centres[rng.integers(0, 40, 10_000)] + 0.35 * rng.normal(size=(10_000, 32))
    syn /= np.linalg.norm(syn, axis=1, keepdims=True)
    # and their 512-d init fingerprints, 400 runs of 5 LoRAs sharing an initialisation among them
    fp = rng.normal(size=(10_000, 512))
    fp[:2000] = np.repeat(rng.normal(size=(400, 512)), 5, axis=0) + 0.5 * rng.normal(size=(2000, 512))
    fp = (fp / np.linalg.norm(fp, axis=1, keepdims=True)).astype(np.float32)
    t0 = time.time()
    g = shared_init_groups(fp)
    syn = centre_groups(syn, g)
    syn /= np.linalg.norm(syn, axis=1, keepdims=True)
    result["seconds_10k_init_groups"] = round(time.time() - t0, 2)
    result["init_groups_10k"] = int(len(np.unique(g)))
    cluster_styles(syn.astype(np.float32))
    result["seconds_10k"] = round(time.time() - t0, 2)
    print("10k LoRAs clustered in", result["seconds_10k"], "s")

    # the map of the whole library, as `studio cluster` draws it
    X = feats["library"]
    res = cluster_styles(X)
    words = []
    for p in paths:
        from studio.library.formats import read_header

        meta = read_header(p).metadata or {}
        info = p.with_suffix(".civitai.info")
        side = json.loads(info.read_text()) if info.exists() else {}
        words.append(metadata_words([meta.get("modelspec.trigger_phrase", ""), meta.get("ss_output_name", ""),
                                     *side.get("trainedWords", []), *side.get("model", {}).get("tags", [])]))
    names = name_clusters(res.labels, words)
    thumbs = [imgs[0] for imgs in images] if images else [None] * len(paths)
    Path(args.map).parent.mkdir(parents=True, exist_ok=True)
    style_map(coords_2d(X), res.labels, thumbs, args.map, cluster_names=names,
              title=f"TinyWorld library: {len(paths)} LoRAs, {res.k} clusters from weights alone")
    result["map"] = str(Path(args.map).relative_to(ROOT))
    result["map_clusters"] = names
    result["targets"] = {"weights_ari": 0.90, "above_image_baseline": True, "seconds_10k": 30}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
