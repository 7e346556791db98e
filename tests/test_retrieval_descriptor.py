"""Training-free weight descriptor: invariances, no densifying, every adapter kind, fit/save/load."""
import time

import numpy as np
import pytest
import torch

from retrieval.descriptor import (DescriptorConfig, WeightDescriptor, lora_svds, lora_svds_many, module_role,
                                  module_svd, raw_blocks)
from retrieval.synthetic import SMALL_TARGETS, synthetic_lora
from studio.library.canonical import LoRA, ModuleLoRA


def _lora(rank: int, seed: int, shapes=SMALL_TARGETS, alpha=None) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    mods = {n: ModuleLoRA("lora", {"down": torch.randn(rank, i, generator=g), "up": torch.randn(o, rank, generator=g)},
                          alpha=alpha) for n, (o, i) in shapes.items()}
    return LoRA(mods, family="tinyworld")


def _reparam(lora: LoRA, seed: int) -> LoRA:
    """B·R, R⁻¹·A with a random well-conditioned R per module: the same ΔW."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in lora.modules.items():
        r = m.rank
        R = torch.randn(r, r, generator=g) + 3 * torch.eye(r)
        out[n] = ModuleLoRA("lora", {"up": m.factors["up"] @ R, "down": torch.linalg.solve(R, m.factors["down"])},
                            alpha=m.alpha)
    return LoRA(out, family=lora.family)


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_svd_is_exact_and_sign_fixed():
    g = torch.Generator().manual_seed(0)
    m = ModuleLoRA("lora", {"down": torch.randn(6, 40, generator=g), "up": torch.randn(30, 6, generator=g)}, alpha=3.0)
    svd = module_svd(m, k=6)
    dense = m.delta_weight()
    assert torch.allclose(svd.S, torch.linalg.svdvals(dense)[:6], rtol=1e-4, atol=1e-5)
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.V.T, dense, atol=1e-4)
    top = svd.U.abs().argmax(dim=0)
    assert (svd.U[top, torch.arange(6)] > 0).all()


def test_reparametrisation_gives_the_identical_descriptor():
    a = _lora(4, 1)
    b = _reparam(a, 2)
    desc = WeightDescriptor()
    va, vb = desc.vector(a), desc.vector(b)
    assert np.allclose(va, vb, atol=2e-4)
    sa, sb = lora_svds(a), lora_svds(b)
    for n in sa:
        assert torch.allclose(sa[n].S, sb[n].S, rtol=1e-4)
        assert torch.allclose(sa[n].U, sb[n].U, atol=1e-3)  # sign-fixed: the vectors themselves agree


def test_alpha_scale_does_not_matter():
    a = _lora(4, 1, alpha=4.0)
    b = LoRA({n: ModuleLoRA("lora", dict(m.factors), alpha=0.5) for n, m in a.modules.items()}, family="tinyworld")
    desc = WeightDescriptor()
    assert np.allclose(desc.vector(a), desc.vector(b), atol=1e-5)


def test_rank4_and_rank16_of_one_subspace_land_close_and_other_loras_far():
    base = _lora(4, 1)
    g = torch.Generator().manual_seed(9)
    mods = {}
    for n, m in base.modules.items():  # rank 16: the same rank-4 ΔW plus a weak tail in other directions
        o, i = m.shape
        up = torch.cat([m.factors["up"], 0.05 * torch.randn(o, 12, generator=g)], 1)
        down = torch.cat([m.factors["down"], 0.05 * torch.randn(12, i, generator=g)], 0)
        mods[n] = ModuleLoRA("lora", {"up": up, "down": down}, alpha=16.0)
    r16 = LoRA(mods, family="tinyworld")
    others = [_lora(4, s) for s in range(10, 22)]
    desc = WeightDescriptor().fit([base, r16, *others])
    v = desc.transform([base, r16, *others])
    same = float(v[0] @ v[1])
    diff = max(float(v[0] @ w) for w in v[2:])
    assert same > 0.9
    assert diff < 0.5 and same - diff > 0.4


def test_same_concept_different_seed_and_rank_is_nearest():
    concepts = ["zorbo", "glimmet", "hat", "stripes", "checker", "ball"]
    loras = [(c, synthetic_lora(c, rank=r, seed=s, shapes=SMALL_TARGETS))
             for c in concepts for r, s in ((4, 0), (16, 1))]
    desc = WeightDescriptor()
    v = desc.fit_transform([l for _, l in loras])
    sims = v @ v.T
    np.fill_diagonal(sims, -1)
    for i, (c, _) in enumerate(loras):
        assert loras[int(np.argmax(sims[i]))][0] == c


def test_plain_lora_never_densifies(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("ΔW was densified")

    monkeypatch.setattr(ModuleLoRA, "delta_weight", refuse)
    monkeypatch.setattr(ModuleLoRA, "lowrank_delta", refuse)
    g = torch.Generator().manual_seed(0)
    big = LoRA({f"unet.big.{i}.to_q": ModuleLoRA("lora", {"down": torch.randn(8, 4096, generator=g),
                                                           "up": torch.randn(4096, 8, generator=g)}, alpha=8.0)
                for i in range(4)}, family="tinyworld")
    start = time.perf_counter()
    v = WeightDescriptor().vector(big)
    assert time.perf_counter() - start < 5.0  # a dense 4096×4096 SVD per module would take far longer
    assert v.shape == (128,) and np.isfinite(v).all()
    svd = module_svd(big.modules["unet.big.0.to_q"], k=4)
    assert svd.U.shape == (4096, 4) and svd.V.shape == (4096, 4)


def _check_against_dense(m: ModuleLoRA, k: int = 3):
    svd = module_svd(m, k)
    dense = m.lowrank_delta().flatten(1)
    ref = torch.linalg.svdvals(dense)[:k]
    assert torch.allclose(svd.S[: len(ref)], ref, rtol=1e-3, atol=1e-5)
    assert svd.V.shape[0] == dense.shape[1]


def test_locon_tucker_loha_lokr():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    _check_against_dense(ModuleLoRA("locon", {"down": r(4, 8, 3, 3), "up": r(16, 4, 1, 1)}, alpha=2.0))
    _check_against_dense(ModuleLoRA("locon", {"down": r(4, 8, 1, 1), "mid": r(4, 4, 3, 3), "up": r(16, 4, 1, 1)}))
    _check_against_dense(ModuleLoRA("loha", {"w1a": r(16, 4), "w1b": r(4, 8), "w2a": r(16, 4), "w2b": r(4, 8)}))
    _check_against_dense(ModuleLoRA("lokr", {"w1": r(4, 2), "w2a": r(4, 2), "w2b": r(2, 4)}))
    mixed = LoRA({"unet.a.to_q": ModuleLoRA("loha", {"w1a": r(16, 4), "w1b": r(4, 8), "w2a": r(16, 4),
                                                      "w2b": r(4, 8)}),
                  "unet.b.conv": ModuleLoRA("locon", {"down": r(4, 8, 3, 3), "up": r(16, 4, 1, 1)})})
    v = WeightDescriptor().vector(mixed)
    assert np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-5


def test_batched_equals_single_and_zero_modules_are_harmless():
    loras = [_lora(4, s) for s in range(3)]
    zero = LoRA({n: ModuleLoRA("lora", {"down": torch.randn(4, i), "up": torch.zeros(o, 4)})
                 for n, (o, i) in SMALL_TARGETS.items()}, family="tinyworld")
    many = lora_svds_many([*loras, zero], 4)
    for lora, svds in zip(loras, many):
        single = lora_svds(lora, 4)
        for n in single:
            assert torch.allclose(single[n].S, svds[n].S)
    blocks = raw_blocks(many[-1], DescriptorConfig())
    assert all(np.all(b == 0) for b in blocks.values())


def test_raw_blocks_do_not_depend_on_the_sign_fix():
    """The catalog's features skip the sign fix (`pack_svds(signs=False)`): the blocks are the same to the bit, at
    ranks below, at and above top_k, for zero modules too."""
    from retrieval.catalog_features import catalog_features
    from retrieval.descriptor import pack_svds, raw_blocks_many, stored_blocks

    cfg = DescriptorConfig()
    loras = [_lora(r, s) for r in (2, 4, 8, 16) for s in range(2)]
    loras.append(LoRA({n: ModuleLoRA("lora", {"down": torch.randn(4, i), "up": torch.zeros(o, 4)})
                       for n, (o, i) in SMALL_TARGETS.items()}, family="tinyworld"))
    fixed = raw_blocks_many(pack_svds(loras, cfg.top_k), cfg)
    for blocks, (_, names, stored, _) in zip(fixed, catalog_features(loras, cfg)):
        ref_names, ref = stored_blocks(blocks, cfg)
        assert names == ref_names and np.array_equal(stored, ref)
    unfixed = raw_blocks_many(pack_svds(loras, cfg.top_k, signs=False), cfg)
    assert all(np.array_equal(a[n], b[n]) for a, b in zip(fixed, unfixed) for n in a)


def test_fit_save_load_and_missing_modules(tmp_path):
    loras = [synthetic_lora(c, 4, s, shapes=SMALL_TARGETS) for c in ("zorbo", "hat", "grid") for s in range(3)]
    desc = WeightDescriptor(DescriptorConfig(dim=16)).fit(loras)
    assert desc.layouts["tinyworld"] == sorted(SMALL_TARGETS)
    path = desc.save(tmp_path / "d.npz")
    again = WeightDescriptor.load(path)
    assert again.fingerprint() == desc.fingerprint()
    assert np.allclose(again.transform(loras), desc.transform(loras))
    half = LoRA({n: m for i, (n, m) in enumerate(loras[0].modules.items()) if i % 2 == 0}, family="tinyworld")
    v = desc.vector(half)  # missing modules are zeros in the layout
    assert v.shape == (16,) and np.isfinite(v).all()
    assert float(v @ desc.vector(loras[0])) > 0.5


def test_pca_keeps_the_top_principal_axes_of_a_full_eigendecomposition():
    """The descriptor's PCA takes only the top eigenpairs of the LoRAs' Gram matrix: the same axes (up to sign)
    and order as all of numpy's."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((40, 300)) * np.linspace(3.0, 0.1, 300)).astype(np.float32)
    desc = WeightDescriptor(DescriptorConfig(dim=16))
    desc._fit_pca("tinyworld", X)
    Xc = (X - X.mean(0)).astype(np.float64)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    comps = desc.components["tinyworld"]
    assert comps.shape == (16, 300)
    assert np.allclose(np.abs((comps * Vt[:16]).sum(1)), 1.0, atol=1e-4)


def test_module_role():
    assert module_role("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k") == "unet:attn2.to_k"
    assert module_role("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == "unet:attn1.to_out"
    assert module_role("text_encoder.text_model.encoder.layers.3.mlp.fc1") == "text_encoder:mlp.fc1"


@pytest.mark.parametrize("rank", [1, 2, 32])
def test_ranks_below_and_above_top_k(rank):
    v = WeightDescriptor().vector(_lora(rank, 3))
    assert v.shape == (128,) and np.isfinite(v).all()
