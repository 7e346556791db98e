"""Learned LoRA encoder: shapes, gradients, invariances, missing layers, training reduces loss, save/load."""
import numpy as np
import pytest
import torch

from retrieval.cpu_bf16 import native_bf16
from retrieval.descriptor import lora_svds
from retrieval.encoder import (LoRAEncoder, TrainingPair, build_config, contrastive_loss, prepare_inputs,
                               train_encoder)
from retrieval.synthetic import SMALL_TARGETS, synthetic_lora
from retrieval.text import HashingEmbedder, Metadata, captions
from studio.library.canonical import LoRA, ModuleLoRA
from studio.tinyworld.catalog import CONCEPTS_BY_NAME

# `encode` runs a bf16 copy where the CPU has native bf16: equal vectors are equal up to bf16 rounding there
ATOL = 5e-3 if native_bf16() else 1e-5

CONCEPTS = ["zorbo", "glimmet", "hat", "glasses", "stripes", "polka", "checker", "starfield"]


def _pair(concept: str, rank: int = 4, seed: int = 0) -> TrainingPair:
    c = CONCEPTS_BY_NAME[concept]
    meta = Metadata(name=concept, trigger_words=[c.trigger], description=c.description, tags=[c.category, c.noun])
    lora = synthetic_lora(concept, rank, seed, shapes=SMALL_TARGETS)
    return TrainingPair(lora_svds(lora, 4), captions(meta), concept, meta.text(), "tinyworld")


@pytest.fixture(scope="module")
def pairs():
    return [_pair(c, r, s) for c in CONCEPTS for r, s in ((4, 0), (8, 1))]


def _encoder(pairs, meta_dim=0, **kw):
    torch.manual_seed(0)
    return LoRAEncoder(build_config(pairs, 32, meta_dim=meta_dim, hidden=32, layers=1, heads=2, **kw))


def test_forward_backward_shapes(pairs):
    enc = _encoder(pairs, meta_dim=32)
    x = prepare_inputs(enc.config, [p.svds for p in pairs[:5]], np.random.randn(5, 32).astype(np.float32),
                       [True, False, True, False, True])
    out = enc(x)
    assert out.shape == (5, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    out.sum().backward()
    for name, p in enc.named_parameters():
        if name == "log_scale":
            continue
        assert p.grad is not None, name
    assert sum(float(p.grad.abs().sum()) for k, p in enc.named_parameters() if k.startswith("probes")) > 0
    assert enc.config.layout == sorted(SMALL_TARGETS)


def test_invariant_to_reparametrisation_and_rank_padding(pairs):
    enc = _encoder(pairs)
    lora = synthetic_lora("hat", 4, 0, shapes=SMALL_TARGETS)
    g = torch.Generator().manual_seed(3)
    mods = {}
    for n, m in lora.modules.items():
        R = torch.randn(4, 4, generator=g) + 3 * torch.eye(4)
        mods[n] = ModuleLoRA("lora", {"up": m.factors["up"] @ R, "down": torch.linalg.solve(R, m.factors["down"])},
                             alpha=m.alpha)
    a = enc.encode([lora_svds(lora, 4)])
    b = enc.encode([lora_svds(LoRA(mods, family="tinyworld"), 4)])
    assert np.allclose(a, b, atol=max(ATOL, 1e-4))


def test_missing_layers_are_zero_filled_and_masked(pairs):
    enc = _encoder(pairs)
    full = pairs[0].svds
    half = {n: s for i, (n, s) in enumerate(full.items()) if i < 5}
    x = prepare_inputs(enc.config, [full, half, {}])
    assert x.present[0].all() and x.present[1].sum() == 5 and not x.present[2].any()
    for t, us in x.US.items():
        assert torch.all(us[2] == 0)
    out = enc(x)
    assert torch.isfinite(out).all()  # even a LoRA with no known layer gives a vector (the pooled CLS token)
    extra = dict(full, **{"unet.not.in.layout.to_q": full[next(iter(full))]})
    assert np.allclose(enc.encode([full]), enc.encode([extra]), atol=1e-6)  # unknown modules are ignored


def test_a_vector_does_not_depend_on_the_other_loras_of_its_batch(pairs):
    """Slots that no LoRA of a batch has are dropped before the transformer (masked in every row anyway): a
    partial LoRA encoded alone, beside other partial ones, or beside a full one gives the same vector."""
    enc = _encoder(pairs, meta_dim=32)
    full = pairs[0].svds
    names = list(full)
    half = {n: full[n] for n in names[:5]}
    other = {n: pairs[3].svds[n] for n in names[2:7]}
    meta = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    alone_w, alone_j = enc.encode([half], meta[:1], [True], both=True)
    w, j = enc.encode([half, other, full], meta, [True, True, True], both=True)
    w2, _ = enc.encode([half, other], meta[:2], [True, True], both=True)
    assert np.allclose(alone_w[0], w[0], atol=ATOL) and np.allclose(alone_j[0], j[0], atol=ATOL)
    assert np.allclose(w2, w[:2], atol=ATOL)


def test_encode_matches_the_float32_model_and_follows_weight_changes(pairs):
    """`encode` runs the inference copy (bf16 on CPUs with native bf16, through SDPA): the float32 model's vectors
    to a cosine above 0.999; a changed weight makes a new copy (vectors follow training)."""
    enc = _encoder(pairs, meta_dim=32)
    svds = [p.svds for p in pairs[:6]]
    meta = np.random.default_rng(1).standard_normal((6, 32)).astype(np.float32)
    with torch.no_grad():
        ref_w, ref_j = enc(prepare_inputs(enc.config, svds, meta), both=True)
    w, j = enc.encode(svds, meta, both=True)
    assert (w * ref_w.numpy()).sum(1).min() > 0.999 and (j * ref_j.numpy()).sum(1).min() > 0.999
    assert enc._inference_model().cls.dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    assert not any(k.startswith("_inference") for k in enc.state_dict())
    with torch.no_grad():
        for p in enc.head[1].parameters():   # in-place changes, as an optimiser step makes: the output negated
            p.mul_(-1.0)
    w2 = enc.encode(svds)
    assert (w2 * w).sum(1).max() < -0.99


def test_stored_descriptor_blocks_are_the_encoders_sketches(pairs):
    """Descriptor blocks as a catalog scan stores them (float16, with its content columns) stand in for the
    encoder's fixed sketches: the same vectors as computing them; a LoRA with a module outside the layout has its
    sketches computed (the stored blocks' log-norm median covers that module too)."""
    from retrieval.descriptor import DescriptorConfig, raw_blocks_many, stored_blocks

    enc = _encoder(pairs)
    cfg = DescriptorConfig()
    assert enc.config.takes_blocks_of(cfg) and not enc.config.takes_blocks_of(DescriptorConfig(sketch=4))
    svds = [p.svds for p in pairs[:4]]
    stored = [stored_blocks(b, cfg) for b in raw_blocks_many(svds, cfg)]
    assert stored[0][1].dtype == np.float16 and stored[0][1].shape[1] > enc.config.descriptor_config().block
    assert np.allclose(enc.encode(svds, stored=stored), enc.encode(svds), atol=1e-6)
    zeros = [(names, np.zeros_like(rows)) for names, rows in stored]
    assert not np.allclose(enc.encode(svds, stored=zeros), enc.encode(svds), atol=1e-3)   # they are what it reads
    extra = dict(svds[0], **{"unet.not.in.layout.to_q": next(iter(svds[0].values()))})
    assert np.allclose(enc.encode([extra], stored=zeros[:1]), enc.encode([extra]), atol=1e-6)   # computed instead


def test_contrastive_loss_groups():
    w = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert float(contrastive_loss(w, w, ["a", "b", "c", "d"], torch.tensor(50.0))) < 0.05
    # two rows of one group are positives of each other: swapping them costs nothing
    t = w[[1, 0, 2, 3]]
    same = contrastive_loss(w, t, ["a", "a", "c", "d"], torch.tensor(50.0))
    diff = contrastive_loss(w, t, ["a", "b", "c", "d"], torch.tensor(50.0))
    assert float(same) < float(diff)


def test_training_reduces_loss_and_retrieves_seen_concepts(pairs, tmp_path):
    emb = HashingEmbedder(64)
    enc, report = train_encoder(pairs, emb, steps=80, batch_size=16, lr=3e-3, hidden=32, layers=1, heads=2, seed=0)
    first, last = np.mean(report.losses[:5]), np.mean(report.losses[-5:])
    assert last < 0.6 * first
    assert enc.config.text_embedder == emb.fingerprint() and enc.config.meta_dim == 64
    # weights alone (no metadata token): each LoRA's vector is nearest its own concept's caption
    w = enc.encode([p.svds for p in pairs])
    t = emb.encode([captions(Metadata(description=CONCEPTS_BY_NAME[c].description))[0] for c in CONCEPTS])
    hits = [CONCEPTS[int(np.argmax(t @ v))] == p.group for v, p in zip(w, pairs)]
    assert np.mean(hits) >= 0.75
    # save / load gives the same vectors
    path = enc.save(tmp_path / "enc.safetensors")
    again = LoRAEncoder.load(path)
    assert np.allclose(again.encode([p.svds for p in pairs[:3]]), w[:3], atol=1e-6)
    assert again.fingerprint() == enc.fingerprint()


def test_pairs_without_metadata_are_not_trained_on(pairs):
    bare = TrainingPair(pairs[0].svds, [], "x")
    with pytest.raises(ValueError):
        train_encoder([bare, TrainingPair(pairs[1].svds, [], "y")], HashingEmbedder(32), steps=1)


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError):
        LoRAEncoder.load(tmp_path / "x.safetensors")
