"""Style clustering from weights: invariances, automatic number of clusters, naming, the map."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from retrieval.clustering import (STYLE_LAYERS, cluster_styles, coords_2d, features_from_blocks, metadata_words,
                                  name_clusters, shared_init_groups, style_features, style_map, weight_summaries)
from studio.library.canonical import LoRA, ModuleLoRA

MODULES = ["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
           "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0",
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"]


def style_library(n_styles=4, per_style=6, seed=0):
    """Each style is a fixed set of output directions (B); every variant has its own random A (as LoRA training
    leaves it), its own rank and alpha, and noise on B."""
    g = torch.Generator().manual_seed(seed)
    styles = [{m: torch.randn(64, 4, generator=g) for m in MODULES} for _ in range(n_styles)]
    loras, truth = [], []
    for s in range(n_styles):
        for v in range(per_style):
            r = (4, 8, 16)[v % 3]
            mods = {}
            for m in MODULES:
                B = torch.cat([styles[s][m], 0.2 * torch.randn(64, r - 4, generator=g)], 1)
                B = B + 0.15 * torch.randn(64, r, generator=g)
                mods[m] = ModuleLoRA("lora", {"down": torch.randn(r, 64, generator=g) / r, "up": B},
                                     alpha=float((r, r / 2, 1)[v % 3]))
            loras.append(LoRA(mods, family="tinyworld"))
            truth.append(s)
    return loras, truth


def test_styles_cluster_together_across_seeds_ranks_and_alphas():
    loras, truth = style_library()
    result = cluster_styles(style_features(loras))
    assert result.k == 4
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.silhouette > 0.5
    assert np.bincount(result.labels).tolist() == sorted(np.bincount(result.labels).tolist(), reverse=True)


def test_features_ignore_the_inner_basis_and_the_scale():
    loras, _ = style_library(n_styles=2, per_style=3)
    m = loras[0].modules[MODULES[0]]
    R = torch.linalg.qr(torch.randn(m.factors["up"].shape[1], m.factors["up"].shape[1]))[0] * 3.0
    twin = LoRA({k: ModuleLoRA("lora", {"down": torch.linalg.inv(R) @ v.factors["down"], "up": v.factors["up"] @ R},
                               alpha=v.alpha * 7) for k, v in loras[0].modules.items()}, family="tinyworld")
    X = style_features(loras + [twin])
    assert float(X[0] @ X[-1]) > 0.999


def batch_runs(n_runs=3, n_styles=4, seed=1):
    """`n_runs` training runs, each from one initialisation (one down matrix A per module, as a fixed trainer seed
    leaves it) and with a strong run-specific output direction (what the run's shared data and noise leave),
    each run training one LoRA of every style."""
    g = torch.Generator().manual_seed(seed)
    style_dirs = [{m: torch.randn(64, 4, generator=g) for m in MODULES} for _ in range(n_styles)]
    loras, style, run = [], [], []
    for r in range(n_runs):
        A = {m: torch.linalg.qr(torch.randn(64, 8, generator=g))[0].T for m in MODULES}   # rank 8
        bias = {m: torch.randn(64, 4, generator=g) for m in MODULES}
        for s in range(n_styles):
            mods = {m: ModuleLoRA("lora", {"down": A[m], "up": torch.cat([style_dirs[s][m], bias[m]], 1)
                                  + 0.1 * torch.randn(64, 8, generator=g)}, alpha=8.0) for m in MODULES}
            loras.append(LoRA(mods, family="tinyworld"))
            style.append(s)
            run.append(r)
    return loras, style, run


def test_what_loras_of_one_initialisation_share_is_taken_out():
    loras, style, run = batch_runs()
    blocks, fingerprints = weight_summaries(loras)
    groups = shared_init_groups(fingerprints)
    assert adjusted_rand_score(run, groups) == 1.0                   # the runs are found from the down matrices
    raw = cluster_styles(features_from_blocks(blocks, layers=STYLE_LAYERS), k=4)
    assert adjusted_rand_score(style, raw.labels) < 0.2               # uncorrected, LoRAs group by run
    result = cluster_styles(style_features(loras))
    assert result.k == 4 and adjusted_rand_score(style, result.labels) == 1.0
    # independent initialisations are never linked, and two copies of one file stay together
    solo, _ = style_library(n_styles=2, per_style=3)
    assert len(set(shared_init_groups(weight_summaries(solo)[1]).tolist())) == len(solo)
    X = style_features(solo + [solo[0]])
    assert float(X[0] @ X[-1]) > 0.999


def test_a_group_loses_only_what_its_members_share():
    """`centre_groups` takes out of each member the other members' mean, shrunk to how much the group shows a
    shared part: a group that shares nothing keeps its rows, a group dominated by one shared direction loses it, and
    no member ever loses its own signal."""
    from retrieval.shared_init import centre_groups, group_shrinkage

    rng = np.random.default_rng(0)
    n, d = 60, 40
    own = rng.normal(size=(n, d)) / np.sqrt(d)           # every row its own signal, unit-sized
    groups = np.arange(n)
    groups[:6] = 100                                     # a batch that shares nothing
    groups[6:12] = 200                                   # a batch that shares one strong direction
    shared = 3.0 * rng.normal(size=d) / np.sqrt(d)
    X = own.copy()
    X[6:12] += shared
    lam = group_shrinkage(X, groups)
    assert set(lam) == {100, 200}
    assert lam[100] < 0.15 and lam[200] > 0.9
    C = centre_groups(X, groups)
    np.testing.assert_allclose(C[:6], X[:6], atol=0.2)    # barely touched
    mean = X.mean(axis=0)
    # the shared direction is gone from the second batch, while each member keeps its own signal
    assert np.abs((C[6:12] - mean) @ shared).max() < 0.3 * float(shared @ shared)
    own_kept = np.einsum("ij,ij->i", C[6:12] - mean, own[6:12]) / np.einsum("ij,ij->i", own[6:12], own[6:12])
    assert own_kept.min() > 0.9
    # with fixed lambdas the map is linear: C(aX + bY) = aC(X) + bC(Y)
    Y = rng.normal(size=X.shape)
    lin = centre_groups(2 * X - Y, groups, lambdas=lam)
    np.testing.assert_allclose(lin, 2 * centre_groups(X, groups, lambdas=lam) - centre_groups(Y, groups, lambdas=lam),
                               atol=1e-9)


def test_fixed_k_and_tiny_libraries():
    loras, truth = style_library(n_styles=3, per_style=4)
    X = style_features(loras)
    assert cluster_styles(X, k=2).k == 2
    assert cluster_styles(X[:2]).k == 1


def test_ten_thousand_descriptors_go_through_the_micro_cluster_path():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16))
    truth = rng.integers(0, 12, 4000)
    X = centres[truth] + 0.3 * rng.normal(size=(4000, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    result = cluster_styles(X.astype(np.float32))
    assert result.k == 12
    assert adjusted_rand_score(truth, result.labels) > 0.98


def test_names_come_from_metadata_words_and_fall_back_to_numbers():
    labels = np.array([0, 0, 0, 1, 1, 2])
    words = [metadata_words(["zq_stripes", "stripes style"]), metadata_words(["stripes, striped"]),
             metadata_words(["zq_stripes"]), metadata_words(["polka dots"]), metadata_words(["polka"]), []]
    names = name_clusters(labels, words)
    assert names[0].startswith("zq_stripes") or names[0].startswith("stripes")
    assert "style" not in names[0]
    assert names[1].split(" / ")[0] == "polka"
    assert names[2] == "cluster 2"


def test_the_map_draws_every_lora_in_its_cluster_colour(tmp_path):
    loras, truth = style_library(n_styles=3, per_style=4)
    X = style_features(loras)
    result = cluster_styles(X)
    thumbs = [Image.new("RGB", (64, 64), (255, 0, 0))] * len(X)
    out = style_map(coords_2d(X), result.labels, thumbs, str(tmp_path / "map.png"), cluster_names=["a", "b", "c"])
    img = np.asarray(Image.open(out))
    assert img.shape[0] == 1100
    assert (np.all(img == [255, 0, 0], axis=-1)).sum() >= 40 * 40 * 3   # thumbnails pasted (some may overlap)
    assert (np.all(img == [31, 119, 180], axis=-1)).sum() > 0            # cluster 0's colour


@pytest.mark.parametrize("bad", ["no attention modules"])
def test_a_library_without_style_layers_is_a_clear_error(bad):
    lora = LoRA({"unet.conv_in": ModuleLoRA("lora", {"down": torch.randn(4, 8), "up": torch.randn(8, 4)})},
                family="tinyworld")
    with pytest.raises(ValueError, match="style layers"):
        style_features([lora, lora, lora])
