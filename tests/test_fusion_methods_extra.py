"""CMLoRA (frequency scores, rotation, real cache reuse), gated fusion (shape, budget, priors, trained gate file)
and K-LoRA (top-K selection per layer and step), on random TinyWorld-shaped models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fusion_fixtures as ff
from fusion import (SCHEDULES, CMLoRA, Composite, Gated, GateParams, KLoRA, LoRARef, LoRARuntime, Plan,
                    build_schedule, frequency_scores)
from fusion import cmlora as cm
from fusion import gated as gt
from fusion.klora import topk_sum
from studio.library.canonical import LoRA, ModuleLoRA

ATOL = 1e-5


@pytest.fixture(scope="module")
def unet():
    return ff.unet(0)


@pytest.fixture(scope="module")
def loras(unet):
    m = {"unet": unet}
    return {n: ff.random_lora(m, rank=4, seed=10 + k, select=ff.is_attention, strength=1.0)
            for k, n in enumerate("abcde")}


@pytest.fixture()
def runtime(unet):
    made = []

    def make(**kw):
        rt = LoRARuntime(unet=unet, **kw)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.remove()


def _max(a, b):
    return (a - b).abs().max().item()


def _cfg_inputs(seed):
    """A CFG batch: [uncond, cond] rows with the same latent, different text embeddings."""
    sample, t, ehs = ff.unet_inputs(batch=2, seed=seed)
    sample = torch.cat([sample[:1], sample[:1]])
    return sample, t, ehs


def _half(inputs, k):
    sample, t, ehs = inputs
    return sample[k:k + 1], t, ehs[k:k + 1]


# ---------------------------------------------------------------- registration


def test_new_methods_are_registered_and_planned():
    refs = [LoRARef("a", 0.8, category="character"), LoRARef("b", 0.6, category="style")]
    for method, cls in [("cmlora", CMLoRA), ("gated", Gated), ("klora", KLoRA)]:
        plan = Plan(loras=refs, method=method, params={})
        assert Plan.from_json(plan.to_json()) == plan
        assert SCHEDULES[method] is cls and type(build_schedule(plan)) is cls
    assert build_schedule(Plan(refs, "cmlora", {"tau": 3, "c_late": 4})).c_late == 4
    with pytest.raises(ValueError, match="bad parameters"):
        build_schedule(Plan(refs, "klora", {"top": 3}))
    with pytest.raises(ValueError, match="must be >= 1"):
        CMLoRA(refs, c_early=0)


# ---------------------------------------------------------------- CMLoRA


def test_hf_share_ranks_textures_above_smooth_images():
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.repeat(((x + y) * 2).clip(0, 255)[..., None], 3, -1).astype(np.uint8)
    checker = np.repeat((((x // 2 + y // 2) % 2) * 255)[..., None], 3, -1).astype(np.uint8)
    s = cm.hf_share(np.stack([smooth, checker]))
    assert s.shape == (2,) and 0 <= s[0] < s[1] <= 1
    assert s[1] - s[0] > 0.1


def test_cmlora_cache_schedule_and_order(unet, loras, runtime):
    rt = runtime(cfg=True)
    for n in "abc":
        rt.load(n, loras[n])
    s = rt.activate(None, CMLoRA([LoRARef("a", category="character"), LoRARef("b", category="style"),
                                  LoRARef("c", category="background")], scores={"a": 0.01, "b": 0.2, "c": 0.05},
                                 tau=2, c_early=2, c_late=4, early=0.4))
    assert s.order == ["b", "c", "a"]  # highest high-frequency score first
    assert [s.dominant(i) for i in range(7)] == ["b", "b", "c", "c", "a", "a", "b"]
    full = s.full_steps(20)
    assert sorted(full) == [0, 2, 4, 6, 10, 14, 18]  # every 2 steps in the first 40 % (0-7), every 4 after
    assert s.unet_rows_per_image(20) == 7 * 4 + 13  # vs Composite's 20 * 4 = 80
    light = s.passes(1, 20, cfg=True)
    assert [(p.branch, p.row, p.reuse) for p in light] == [("uncond", 0, True), ("cond", 1, True), ("cond", 2, True),
                                                           ("cond", 3, True), ("cond", 2, False)]
    assert all(not p.reuse and p.key for p in s.passes(0, 20, cfg=True))
    w = s.weights(0, 20)
    assert w.shape[:2] == (4, 3) and w[0].abs().sum() == 0
    # without scores: the in-memory cache by LoRA hash, then the category prior
    cm._SCORES[f"{cm.lora_hash(loras['c'])}|test"] = 0.5
    try:
        s2 = rt.activate(None, CMLoRA([LoRARef("a", category="character"), LoRARef("b", category="style"),
                                       LoRARef("c")]))
        assert s2.order == ["c", "b", "a"] and s2.resolved_scores["c"] == 0.5
    finally:
        cm._SCORES.pop(f"{cm.lora_hash(loras['c'])}|test")


def test_cmlora_reuses_cached_passes_for_real(unet, loras, runtime):
    """Full steps compute N+1 rows (and equal Composite with the dominant's weight raised); cached steps compute
    ONE row, and their output is the cache formula applied to the earlier step's outputs."""
    names = ["a", "b", "c"]
    clean = copy.deepcopy(unet)
    singles = {n: ff.reference({"unet": clean}, [(loras[n], 1.0)])["unet"] for n in names}
    rt = runtime(cfg=True)
    for n in names:
        rt.load(n, loras[n])
    s = rt.activate(None, CMLoRA(names, scores={"a": 3, "b": 2, "c": 1}, tau=1, c_early=3, c_late=3,
                                 dominance=1.0))
    rows = []
    hook = unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        n_steps = 4  # full steps 0 and 3; 1 and 2 reuse the cache of step 0
        assert s.full_steps(n_steps) == {0, 3}
        inputs = [_cfg_inputs(seed) for seed in range(n_steps)]
        outs = []
        for step in range(n_steps):
            rt.set_step(step, n_steps)
            outs.append(ff.run_unet(unet, inputs[step]))
    finally:
        hook.remove()
    assert rows == [4, 1, 1, 4]  # uncond + 3 LoRAs on full steps; only the dominant on cached steps
    assert rt.unet_rows == 4 + 1 + 1 + 4

    def eps(model, step, branch):
        return ff.run_unet(model, _half(inputs[step], branch))

    # step 0 (full, dominant "a"): uncond = base, cond = weighted mean with a's weight raised
    a = s.mix(0)
    assert torch.allclose(a, torch.tensor([0.5, 0.25, 0.25]))
    u0 = eps(clean, 0, 0)
    e0 = [eps(singles[n], 0, 1) for n in names]
    assert _max(outs[0][:1], u0) < ATOL
    assert _max(outs[0][1:], sum(a[i] * e0[i] for i in range(3))) < ATOL
    # step 1 (cached, dominant "b"): one fresh pass of b at step 1, every other output from step 0's cache
    fresh = eps(singles["b"], 1, 1)
    base = fresh - (e0[1] - u0)
    a = s.mix(1)
    expected_cond = base + sum(a[i] * (e0[i] - u0) for i in range(3))
    # sums of four UNet outputs, batched (runtime) vs one row at a time (reference): a few float32 ulps more
    assert _max(outs[1][:1], base) < 4 * ATOL and _max(outs[1][1:], expected_cond) < 4 * ATOL
    # the cached outputs really are step 0's: recomputing them at step 1 would differ
    assert _max(eps(singles["a"], 1, 1), e0[0]) > 1e-3


def test_cmlora_is_cheaper_than_composite_in_a_pipeline(tmp_path):
    pipe = ff.tiny_pipeline(tmp_path)
    m = {"unet": pipe.unet}
    loras = {n: ff.random_lora(m, rank=4, seed=k, select=ff.is_attention) for k, n in enumerate("xyz")}
    rt = LoRARuntime(pipe)
    try:
        for n, lo in loras.items():
            rt.load(n, lo)
        counts, scheds = {}, {}
        for label, sched in [("composite", Composite(list(loras))), ("cmlora", CMLoRA(list(loras)))]:
            rt.activate(None, sched)
            rt.unet_rows = 0
            g = torch.Generator().manual_seed(0)
            img = pipe(["a red star", "a blue star"], num_inference_steps=10, generator=g, output_type="np").images
            assert np.isfinite(img).all()
            counts[label], scheds[label] = rt.unet_rows / 2, sched
        assert counts["composite"] == 10 * 4
        assert counts["cmlora"] == scheds["cmlora"].unet_rows_per_image(10)
        assert counts["composite"] / counts["cmlora"] >= 1.8
    finally:
        rt.remove()


def test_frequency_scores_are_computed_once(tmp_path, monkeypatch):
    pipe = ff.tiny_pipeline(tmp_path)
    m = {"unet": pipe.unet}
    loras = {"x": ff.random_lora(m, rank=4, seed=1, select=ff.is_attention, strength=2.0),
             "y": ff.random_lora(m, rank=4, seed=2, select=ff.is_attention, strength=0.5)}
    calls = []
    real = cm._render

    def counting(*args):
        calls.append(args[6])
        return real(*args)

    monkeypatch.setattr(cm, "_render", counting)
    path = tmp_path / "scores.json"
    scores = frequency_scores(pipe, loras, prompts=["a red star"], n_images=2, steps=2, cache_path=path)
    assert set(scores) == {"x", "y"} and all(np.isfinite(v) for v in scores.values())
    assert calls == ["x", None, "y", None]  # each LoRA alone, then the no-LoRA baseline of the same prompts
    assert frequency_scores(pipe, loras, prompts=["a red star"], n_images=2, steps=2, cache_path=path) == scores
    assert len(calls) == 4  # the second call renders nothing
    assert path.exists() and len(__import__("json").loads(path.read_text())) >= 2
    assert pipe.unet.__dict__.get("_fusion_runtime") is None  # the temporary runtime is gone
    sched = CMLoRA(["x", "y"])
    rt = LoRARuntime(unet=pipe.unet)
    try:
        rt.load("x", loras["x"]), rt.load("y", loras["y"])
        rt.activate(None, sched)
        assert sched.resolved_scores == pytest.approx(scores)  # read from the in-memory cache by LoRA hash
    finally:
        rt.remove()


# ---------------------------------------------------------------- gated fusion


CATS = ["character", "clothing", "style", "background", "object"]


def test_gated_weights_shape_budget_and_priors(unet, loras, runtime):
    rt = runtime()
    for n in "abcde":
        rt.load(n, loras[n])
    for n_loras in range(1, 6):
        names = list("abcde")[:n_loras]
        s = rt.activate(None, Gated([LoRARef(n, category=c) for n, c in zip(names, CATS)], gate="default",
                                    budget=0.5))
        L = len(s.binding.unet_layers)
        for step in (0, 9, 19):
            w = s.weights(step, 20)
            assert w.shape == (1, n_loras, L)
            assert (w >= 0).all() and (w <= 2).all()
            assert (w[0].sum(0) <= 1 + 0.5 * (n_loras - 1) + 1e-5).all()  # the per-layer budget
    s = rt.activate(None, Gated([LoRARef(n, category=c) for n, c in zip("abcde", CATS)], gate="default"))
    layers = s.binding.unet_layers
    early, late = s.weights(0, 20)[0], s.weights(19, 20)[0]
    down = [k for k, x in enumerate(layers) if ".down_blocks." in x]
    up = [k for k, x in enumerate(layers) if ".up_blocks." in x]
    assert early[0].mean() > late[0].mean()  # character: early
    assert late[2].mean() > early[2].mean()  # style: late
    assert early[0, down].mean() > early[0, up].mean()  # character: down blocks
    assert late[2, up].mean() > late[2, down].mean()  # style: up blocks
    # without categories or training the gate keeps each LoRA's weight where the budget allows
    s = rt.activate(None, Gated({"a": 0.7}, gate="default", gamma=0.0))
    assert torch.allclose(s.weights(5, 20), torch.full_like(s.weights(5, 20), 0.7))


def test_gated_runs_its_weights_in_the_runtime(unet, loras, runtime):
    clean = {"unet": copy.deepcopy(unet)}
    inputs = ff.unet_inputs()
    rt = runtime()
    rt.load("a", loras["a"]), rt.load("b", loras["b"])
    s = rt.activate(None, Gated([LoRARef("a", category="character"), LoRARef("b", category="style")],
                                gate="default", budget=0.5))   # weights below 1: float32 rounding stays < 1e-4
    layers = s.binding.unet_layers
    for step in (0, 7):
        w = s.weights(step, 8)[0]
        ref = ff.reference(clean, [(loras[n], lambda x, i=i: float(w[i, layers.index(x)]))
                                   for i, n in enumerate("ab")])["unet"]
        rt.set_step(step, 8)
        assert _max(ff.run_unet(unet, inputs), ff.run_unet(ref, inputs)) < 1e-4  # strong LoRAs: float32 rounding


def test_gate_training_moves_the_gate_and_the_file_round_trips(tmp_path):
    from PIL import Image

    pipe = ff.tiny_pipeline(tmp_path)
    m = {"unet": pipe.unet}
    loras = {n: ff.random_lora(m, rank=4, seed=k, select=ff.is_attention, strength=1.0)
             for k, n in enumerate(["hero", "ink", "sky"])}
    cats = {"hero": "character", "ink": "style", "sky": "background"}
    rng = np.random.default_rng(0)
    samples = {n: ([Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)],
                   [f"a picture of {n}"] * 2) for n in loras}
    params, info = gt.train_gate(pipe, loras, cats, samples, steps=4, batch=2, lr=0.1, log=None)
    assert info["images"] == 6 and np.isfinite(info["loss_last50"])
    assert params.theta.abs().sum() > 0  # the gate moved
    assert pipe.unet.__dict__.get("_fusion_runtime") is None
    path = tmp_path / "gate.safetensors"
    params.save(path, meta={"train": info})
    back = GateParams.load(path)
    assert torch.equal(back.theta, params.theta) and back.blocks == params.blocks
    assert path.stat().st_size < 1_000_000
    rt = LoRARuntime(unet=pipe.unet)
    try:
        for n, lo in loras.items():
            rt.load(n, lo)
        refs = [LoRARef(n, category=c) for n, c in cats.items()]
        trained = rt.activate(None, Gated(refs, gate=str(path))).weights(3, 10)
        default = rt.activate(None, Gated(refs, gate="default")).weights(3, 10)
        assert trained.shape == default.shape and not torch.allclose(trained, default)
    finally:
        rt.remove()


def test_committed_trained_gate_loads():
    if not gt.TRAINED_GATE.exists():
        pytest.skip(f"no trained gate at {gt.TRAINED_GATE} (python -m fusion.gated writes it)")
    g = GateParams.load(gt.TRAINED_GATE)
    assert g.theta.shape == (len(gt.CATEGORIES), len(g.blocks), g.n_buckets)
    assert gt.TRAINED_GATE.stat().st_size < 1_000_000
    assert torch.isfinite(g.theta).all() and torch.isfinite(g.log_budget).all()
    assert "single-LoRA" in g.meta.get("train", "")


def test_co_active_sets_follow_the_benchmark_rule():
    import random

    cats = ["character", "character", "style", "style", "clothing", "object", "background"]
    rng = random.Random(0)
    for _ in range(200):
        i = rng.randrange(len(cats))
        s = gt.co_active_sets(cats, i, rng)
        assert s[0] == i and 2 <= len(s) <= 5
        chosen = [cats[j] for j in s]
        assert len(set(chosen)) == len(chosen) and chosen.count("character") == 1


# ---------------------------------------------------------------- K-LoRA


def _scaled(lora: LoRA, factor) -> LoRA:
    return LoRA({n: ModuleLoRA(m.kind, {"down": m.factors["down"], "up": m.factors["up"] * factor(n)}, alpha=m.alpha)
                 for n, m in lora.modules.items()}, family=lora.family)


def test_klora_topk_sums_and_argmax(unet, loras, runtime):
    rt = runtime()
    rt.load("a", loras["a"]), rt.load("b", loras["b"])
    s = rt.activate(None, KLoRA(["a", "b"], k=16, normalise=False))
    layers = s.binding.unet_layers
    for i, n in enumerate("ab"):
        for j in (0, len(layers) // 2, len(layers) - 1):
            delta = loras[n].modules[layers[j]].delta_weight().abs().flatten()
            assert s.topk[i, j].item() == pytest.approx(delta.sort(descending=True).values[:16].sum().item(), rel=1e-5)
    expected = (s.topk[1] > s.topk[0]).long()
    assert torch.equal(s.choice(0, 10), expected)  # no style LoRA: the larger top-K sum, every step
    w = s.weights(0, 10)[0]
    assert torch.equal(w[1] > 0, expected.bool()) and torch.equal(w[0] > 0, ~expected.bool())
    assert (w.sum(0) == 1).all()  # exactly one LoRA per layer, at its weight
    assert topk_sum(torch.tensor([[1.0, -5.0], [2.0, 0.5]]), 2) == 7.0


def test_klora_favours_content_early_and_style_late(unet, loras, runtime):
    base = loras["c"]
    content = _scaled(base, lambda n: 1.0)
    up = lambda n: ".up_blocks." in n  # noqa: E731
    style = _scaled(base, lambda n: 1.3 if up(n) else 0.3)  # relatively strong in the up blocks
    rt = runtime()
    rt.load("hero", content), rt.load("ink", style)
    s = rt.activate(None, KLoRA([LoRARef("hero", category="character"), LoRARef("ink", category="style")]))
    assert s.style == ["ink"]
    layers = s.binding.unet_layers
    ups = torch.tensor([up(x) for x in layers])
    early, late = s.choice(0, 20), s.choice(19, 20)
    assert s.style_scale(0, 20) == 0.5 and s.style_scale(19, 20) == pytest.approx(1.925)
    # normalised importance relative to hero: ink's up layers 1.3/m, others 0.3/m, m = 0.56·1.3 + 0.44·0.3 = 0.86
    ratio = s.importance[1] / s.importance[0]
    assert ratio[ups].mean().item() == pytest.approx(1.3 / 0.863, rel=0.02)
    assert (early == 0).all()  # × 0.5 early: hero (content) everywhere
    assert (late[ups] == 1).all() and (late[~ups] == 0).all()  # late: the style takes the up blocks only
    # the runtime runs exactly the chosen LoRA per layer
    clean = {"unet": copy.deepcopy(unet)}
    inputs = ff.unet_inputs()
    w = s.weights(19, 20)[0]
    ref = ff.reference(clean, [(content, lambda x: float(w[0, layers.index(x)])),
                               (style, lambda x: float(w[1, layers.index(x)]))])["unet"]
    rt.set_step(19, 20)
    assert _max(ff.run_unet(unet, inputs), ff.run_unet(ref, inputs)) < ATOL
