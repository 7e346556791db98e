"""The fusion runtime on random-weight TinyWorld models: exactness, batching, fusing, pipelines, diffusers parity."""
from __future__ import annotations

import torch
import pytest

import fusion_fixtures as ff
from fusion import BlockWise, Composite, LoRARef, LoRARuntime, Merge, Pass, Schedule, Switch
from fusion.layers import LOWRANK, PATCHED, AdaptedLayer

ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    return {"unet": ff.unet(0), "text_encoder": ff.text_encoder(1)}


@pytest.fixture(scope="module")
def loras(models):
    return {
        "a": ff.random_lora(models, rank=4, seed=1, alpha=2.0),
        "b": ff.random_lora(models, rank=8, seed=2, select=ff.is_attention),
        "c": ff.random_lora(models, rank=16, seed=3, select=lambda n: "resnets" in n or "attn2" in n, alpha=8.0),
        "dense": ff.dense_kinds_lora(models, seed=4),
    }


@pytest.fixture()
def unet(models):
    return models["unet"]


@pytest.fixture()
def runtime(models):
    made = []

    def make(**kw):
        rt = LoRARuntime(unet=models["unet"], text_encoder=models["text_encoder"], **kw)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.remove()


def _max(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("strategy", ["lowrank", "auto"])
def test_one_lora_equals_weight_replacement(models, loras, runtime, strategy):
    inputs = ff.unet_inputs()
    expected = ff.run_unet(ff.reference({"unet": models["unet"]}, [(loras["a"], 0.7)])["unet"], inputs)
    rt = runtime(strategy=strategy)
    rt.load("a", loras["a"])
    rt.activate(["a"], Merge({"a": 0.7}))
    out = ff.run_unet(models["unet"], inputs)
    assert _max(out, expected) < ATOL
    kinds = {type(m).__name__ for n, m in models["unet"].named_modules() if isinstance(m, AdaptedLayer)}
    assert kinds == {"AdaptedLayer"}
    modes = {layer.mode for layer in rt.layers.values() if layer.name.startswith("unet.")}
    assert modes == ({PATCHED} if strategy == "auto" else {LOWRANK})


@pytest.mark.parametrize("strategy", ["lowrank", "auto"])
def test_text_encoder_lora(models, loras, runtime, strategy):
    te = models["text_encoder"]
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ref = ff.reference({"text_encoder": te}, [(loras["a"], 0.5), (loras["b"], -0.3)])["text_encoder"]
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        rt = runtime(strategy=strategy)
        rt.load("a", loras["a"]), rt.load("b", loras["b"])
        rt.activate(["a", "b"], Merge([LoRARef("a", weight=9.0, te_weight=0.5), LoRARef("b", te_weight=-0.3)]))
        out = te(ids).last_hidden_state
    assert _max(out, expected) < ATOL


@pytest.mark.parametrize("strategy", ["lowrank", "auto"])
def test_concatenated_loras_equal_sum_of_each(models, loras, runtime, strategy):
    inputs = ff.unet_inputs(batch=3)
    weights = {"a": 0.6, "b": -0.8, "c": 1.3, "dense": 0.5}
    expected = ff.run_unet(ff.reference({"unet": models["unet"]},
                                        [(loras[n], w) for n, w in weights.items()])["unet"], inputs)
    rt = runtime(strategy=strategy)
    for n in weights:
        rt.load(n, loras[n])
    rt.activate(list(weights), Merge(weights))
    out = ff.run_unet(models["unet"], inputs)
    assert _max(out, expected) < ATOL
    q = rt.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"]
    assert q.down.shape[0] == 4 + 8 + 16 and q.dense is None  # three LoRAs, one concatenated factor pair
    assert rt.layers["unet.down_blocks.1.resnets.0.conv1"].dense.shape[0] == 1  # LoHa on the dense path


def test_per_branch_weights_differ_per_half(models, loras, runtime):
    inputs = ff.unet_inputs(batch=4)
    base = ff.run_unet(models["unet"], inputs)
    full = ff.run_unet(ff.reference({"unet": models["unet"]}, [(loras["a"], 0.9)])["unet"], inputs)
    half = ff.run_unet(ff.reference({"unet": models["unet"]}, [(loras["a"], 0.45)])["unet"], inputs)
    rt = runtime(cfg=True)
    rt.load("a", loras["a"])
    rt.activate(["a"], BlockWise({"a": 0.9}, uncond_scale=0.0))
    out = ff.run_unet(models["unet"], inputs)
    assert _max(out[:2], base[:2]) < ATOL and _max(out[2:], full[2:]) < ATOL
    assert {layer.mode for layer in rt.layers.values() if layer.name.startswith("unet.")} == {LOWRANK}
    rt.activate(["a"], BlockWise({"a": 0.9}, uncond_scale=0.5))
    out = ff.run_unet(models["unet"], inputs)
    assert _max(out[:2], half[:2]) < ATOL and _max(out[2:], full[2:]) < ATOL
    rt.cfg = False  # without CFG every sample is conditional
    assert _max(ff.run_unet(models["unet"], inputs), full) < ATOL


def test_fuse_unfuse_1000_cycles_bit_exact(models, loras, runtime):
    unet = models["unet"]
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    inputs = ff.unet_inputs()
    base = ff.run_unet(unet, inputs)
    rt = runtime(strategy="lowrank")
    for n in ("b", "dense"):
        rt.load(n, loras[n])
    rt.activate(["b", "dense"], Merge({"b": 0.7, "dense": 0.3}))
    lowrank = ff.run_unet(unet, inputs)
    rt.fuse()
    assert all(layer.mode == PATCHED for layer in rt.layers.values())
    fused = ff.run_unet(unet, inputs)
    assert _max(fused, lowrank) < ATOL
    rt.unfuse()
    for _ in range(999):
        rt.fuse()
        rt.unfuse()
    after = {k.replace(".base.", "."): v for k, v in unet.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert _max(ff.run_unet(unet, inputs), lowrank) < ATOL  # back to running the schedule
    rt.fuse({"b": 0.0})
    assert torch.equal(ff.run_unet(unet, inputs), base)
    rt.remove()
    assert not any(isinstance(m, AdaptedLayer) for m in unet.modules())
    assert "forward" not in unet.__dict__
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert torch.equal(ff.run_unet(unet, inputs), base)


def test_fuse_refuses_dynamic_schedules(models, loras, runtime):
    rt = runtime()
    rt.load("a", loras["a"]), rt.load("b", loras["b"])
    rt.activate(["a", "b"], Switch(["a", "b"], tau=2))
    with pytest.raises(ValueError, match="static"):
        rt.fuse()
    rt.fuse({"a": 0.5})  # explicit weights are always fusable
    rt.unfuse()


def test_grad_mode_keeps_base_weights(models, loras, runtime):
    unet = models["unet"]
    rt = runtime()
    rt.load("a", loras["a"])
    rt.activate(["a"], Merge({"a": 0.5}))
    sample, t, ehs = ff.unet_inputs()
    out = unet(sample, t, encoder_hidden_states=ehs).sample
    assert not any(layer.patched for layer in rt.layers.values())
    out.square().mean().backward()
    assert unet.conv_in.base.weight.grad is not None
    unet.zero_grad(set_to_none=True)


def test_switch_activates_the_right_lora_each_step(models, loras, runtime):
    inputs = ff.unet_inputs()
    unet = models["unet"]
    each = {n: ff.run_unet(ff.reference({"unet": unet}, [(loras[n], 0.8)])["unet"], inputs) for n in ("a", "b")}
    rt = runtime()
    rt.load("a", loras["a"]), rt.load("b", loras["b"])
    schedule = rt.activate(None, Switch([LoRARef("a", 0.8, category="style"), LoRARef("b", 0.8, category="character")],
                                        tau=2))
    assert schedule.order == ["b", "a"]
    for step in range(7):
        rt.set_step(step, 7)
        expected = ["b", "b", "a", "a", "b", "b", "a"][step]
        assert schedule.active(step) == expected
        assert _max(ff.run_unet(unet, inputs), each[expected]) < ATOL, step


def test_composite_batched_equals_separate_passes(models, loras, runtime):
    unet = models["unet"]
    sample, t, ehs = ff.unet_inputs(batch=4)
    names = ["a", "b", "c"]
    singles = {n: ff.reference({"unet": unet}, [(loras[n], 0.8)])["unet"] for n in names}
    with torch.no_grad():
        uncond = unet(sample[:2], t, encoder_hidden_states=ehs[:2]).sample
        conds = [singles[n](sample[2:], t, encoder_hidden_states=ehs[2:]).sample for n in names]
    rt = runtime(cfg=True)
    for n in names:
        rt.load(n, loras[n])
    rt.activate(names, Composite({n: 0.8 for n in names}))
    calls, rows = rt.unet_calls, rt.unet_rows
    out = ff.run_unet(unet, (sample, t, ehs))
    assert rt.unet_calls == calls + 1 and rt.unet_rows == rows + 8  # one call: 1 + 3 passes of 2 rows
    assert _max(out[:2], uncond) < ATOL
    assert _max(out[2:], torch.stack(conds).mean(0)) < ATOL
    # the reference's per-LoRA unconditional passes
    rt.activate(names, Composite({n: 0.8 for n in names}, uncond="per_lora"))
    with torch.no_grad():
        unconds = [singles[n](sample[:2], t, encoder_hidden_states=ehs[:2]).sample for n in names]
    out = ff.run_unet(unet, (sample, t, ehs))
    assert _max(out[:2], torch.stack(unconds).mean(0)) < ATOL and _max(out[2:], torch.stack(conds).mean(0)) < ATOL


class _CachedSecond(Schedule):
    """A CMLoRA-shaped toy: LoRA 2's conditional pass is computed on even steps and reused on odd ones."""

    def weights(self, step, n_steps):
        table = self.table(step, n_steps)
        eye = torch.eye(table.shape[0])
        return torch.cat([torch.zeros_like(table)[None], eye[:, :, None] * table[None]])

    def passes(self, step, n_steps, cfg):
        return [Pass("uncond", 0), Pass("cond", 1), Pass("cond", 2, key="second", reuse=step % 2 == 1)]


def test_multi_pass_cache_reuses_outputs(models, loras, runtime):
    unet = models["unet"]
    inputs = ff.unet_inputs(batch=2)
    rt = runtime(cfg=True)
    rt.load("a", loras["a"]), rt.load("b", loras["b"])
    rt.activate(["a", "b"], _CachedSecond({"a": 1.0, "b": 1.0}))
    rt.set_step(0, 4)
    rows = rt.unet_rows
    first = ff.run_unet(unet, inputs)
    assert rt.unet_rows - rows == 3  # uncond, cond a, cond b (one row each)
    cached = rt.cache["second"].clone()
    rt.set_step(1, 4)
    rows = rt.unet_rows
    second = ff.run_unet(unet, ff.unet_inputs(batch=2, seed=5))
    assert rt.unet_rows - rows == 2  # LoRA b's pass is not recomputed
    assert torch.equal(rt.cache["second"], cached)
    assert not torch.equal(first, second)


def test_load_rejects_foreign_loras(models, runtime):
    from studio.library.canonical import LoRA, ModuleLoRA

    rt = runtime()
    bad = LoRA({"unet.down_blocks.9.attentions.0.proj_in": ModuleLoRA("lora", {"down": torch.zeros(2, 4),
                                                                              "up": torch.zeros(4, 2)})})
    with pytest.raises(ValueError, match="not Linear/Conv2d modules of this model"):
        rt.load("bad", bad)
    wrong = LoRA({"unet.conv_in": ModuleLoRA("locon", {"down": torch.zeros(2, 3, 3, 3), "up": torch.zeros(32, 2, 1, 1)})})
    with pytest.raises(ValueError, match="ΔW"):
        rt.load("wrong", wrong)
    with pytest.raises(KeyError, match="not loaded"):
        rt.activate(["nope"])
    with pytest.raises(RuntimeError, match="already has a LoRARuntime"):
        LoRARuntime(unet=models["unet"])


# ---------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return ff.tiny_pipeline(tmp_path_factory.mktemp("pipe"))


class _Recorder(Merge):
    def __init__(self, loras):
        super().__init__(loras)
        self.seen = []

    def weights(self, step, n_steps):
        self.seen.append((step, n_steps))
        return super().weights(step, n_steps)


def _generate(pipe, **kw):
    from studio.tinyworld.models import VAE_CONFIG

    size = VAE_CONFIG["sample_size"]
    return pipe("a red star", num_inference_steps=3, height=size, width=size, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def test_pipeline_three_steps(pipe):
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    lora = ff.random_lora(models, rank=4, seed=7, strength=2.0)
    base = _generate(pipe)
    ref = ff.reference(models, [(lora, 1.0)])  # before the runtime wraps the models
    rt = LoRARuntime(pipe)
    try:
        rt.load("x", lora)
        schedule = rt.activate(["x"], _Recorder({"x": 0.0}))
        assert (_generate(pipe) == base).all()  # weight 0: exactly the base image
        assert schedule.seen == [(0, 3), (1, 3), (2, 3)]  # steps read from the scheduler
        rt.activate(["x"], Merge({"x": 1.0}))
        with_lora = _generate(pipe)
        assert not (with_lora == base).all()
        original = pipe.unet, pipe.text_encoder
        rt.deactivate()
        pipe.unet, pipe.text_encoder = ref["unet"], ref["text_encoder"]
        try:
            expected = _generate(pipe)
        finally:
            pipe.unet, pipe.text_encoder = original
        assert abs(with_lora - expected).max() < 1e-4
        rt.activate(["x"], Composite({"x": 1.0}))
        composite = _generate(pipe)
        assert composite.shape == base.shape and abs(composite - base).max() > 0
        rt.activate(["x"], Switch({"x": 1.0}, tau=1))
        assert abs(_generate(pipe) - with_lora).max() < 1e-4  # one LoRA: switch is a merge
    finally:
        rt.remove()
    assert (_generate(pipe) == base).all()


def test_parity_with_diffusers_load_lora_weights(pipe, tmp_path):
    import copy

    from studio.library.formats import write_lora

    lora = ff.random_lora({"unet": pipe.unet}, rank=4, seed=11, alpha=3.0, strength=1.0,
                          select=lambda n: ff.is_attention(n) or "resnets" in n)
    path = write_lora(lora, tmp_path / "x.safetensors", format="diffusers")
    ours = copy.deepcopy(pipe.unet)
    inputs = ff.unet_inputs()
    base = ff.run_unet(ours, inputs)
    rt = LoRARuntime(unet=ours)
    rt.load("x", lora)
    rt.activate(["x"], Merge({"x": 0.8}))
    runtime_out = ff.run_unet(ours, inputs)
    rt.remove()
    try:
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[0.8])
        diffusers_out = ff.run_unet(pipe.unet, inputs)
    finally:
        pipe.unload_lora_weights()
    assert _max(runtime_out, base) > 1e-2
    assert _max(runtime_out, diffusers_out) < 1e-4


# ---------------------------------------------------------------- low-rank plans vs a dense per-sample reference

from torch import nn  # noqa: E402

from fusion.layers import PER_SAMPLE, SEGMENTS, SHARED  # noqa: E402

def _close(a, b, tol=1e-5):
    """Equal to float32 rounding, relative to the size of the values."""
    return _max(a, b) <= tol * (1 + b.abs().max().item())


RANKS = {0: 2, 1: 3, 3: 4}  # fast LoRAs (binding index: rank); LoRA 2 is dense (a LoHa-like full ΔW)


def _layer(kind: str, seed: int = 0):
    """An AdaptedLayer with three fast LoRAs and one dense one, the per-LoRA ΔWs, and an input of batch 4."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        base = nn.Conv2d(6, 10, 3, stride=2, padding=1)
        x = torch.randn(4, 6, 9, 9, generator=g)
    else:
        base = nn.Linear(12, 10)
        x = torch.randn(4, 7, 12, generator=g) if kind == "linear" else torch.randn(4, 12, generator=g)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) * 0.3)
    k = base.weight.shape[2:]
    fast, deltas = [], {}
    for i, r in RANKS.items():
        down = torch.randn(r, base.weight.shape[1], *k, generator=g)
        up = torch.randn(base.weight.shape[0], r, generator=g) * 0.5
        fast.append((i, down, up))
        deltas[i] = (up @ down.reshape(r, -1)).reshape(base.weight.shape)
    deltas[2] = torch.randn(base.weight.shape, generator=g) * 0.2
    layer = AdaptedLayer(base, "layer")
    layer.set_loras(fast, [(2, deltas[2])])
    return layer, deltas, x


def _dense_reference(layer: AdaptedLayer, deltas: dict, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W0 + Σ_i w[b, i] ΔW_i`` applied to each sample b on its own (differentiable in `w [batch, 4]`)."""
    w0 = layer.base.weight.detach()
    outs = []
    for b in range(x.shape[0]):
        weight = w0 + sum(w[b, i] * deltas[i] for i in range(w.shape[1]))
        if layer.is_conv:
            b_ = layer.base
            outs.append(torch.nn.functional.conv2d(x[b : b + 1], weight, b_.bias, b_.stride, b_.padding))
        else:
            outs.append(torch.nn.functional.linear(x[b : b + 1], weight, layer.base.bias))
    return torch.cat(outs)


def _per_rank(w: torch.Tensor) -> torch.Tensor:
    """Per-LoRA weights ``[..., 4]`` → the fast rank axis ``[..., Σr]`` (each weight repeated over its ranks)."""
    return torch.cat([w[..., i : i + 1].expand(*w.shape[:-1], r) for i, r in RANKS.items()], dim=-1)


W4 = torch.tensor([[0.0, 0.7, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0],  # CFG-uncond-like half: LoRA 1 only
                   [0.9, -0.4, 0.6, 1.3], [0.9, -0.4, 0.6, 1.3]])  # cond half: all, the dense one included


@pytest.mark.parametrize("kind", ["linear", "linear2d", "conv"])
@pytest.mark.parametrize("grad", [False, True])
def test_plan_shared_equals_dense_reference(kind, grad):
    layer, deltas, x = _layer(kind)
    w = torch.tensor([0.8, -0.5, 0.3, 1.1])
    expected = _dense_reference(layer, deltas, x, w.expand(4, -1))
    with torch.set_grad_enabled(grad):
        layer.set_shared(_per_rank(w), w[2:3])
        assert layer.plan == SHARED and layer.mode == LOWRANK
        out = layer(x)
        assert _close(out, expected)
        layer.set_shared(_per_rank(w), None)  # dense LoRA at 0
        assert _close(layer(x), _dense_reference(layer, deltas, x, (w * torch.tensor([1, 1, 0, 1])).expand(4, -1)))
        layer.set_shared(None, None)
        assert layer.mode != LOWRANK and torch.equal(layer(x), layer.base(x))
        # only LoRA 1 (ranks 2:5) non-zero: run just those ranks
        w1 = torch.tensor([0.0, 0.9, 0.0, 0.0])
        layer.set_shared(_per_rank(w1), None, ranks=(2, 5))
        assert layer.up_w.shape[1] == 3
        assert _close(layer(x), _dense_reference(layer, deltas, x, w1.expand(4, -1)))


@pytest.mark.parametrize("kind", ["linear", "linear2d", "conv"])
def test_plan_segments_equals_dense_reference(kind):
    layer, deltas, x = _layer(kind)
    expected = _dense_reference(layer, deltas, x, W4)
    fast = _per_rank(W4)
    # rows 0:2 run only LoRA 1's ranks (2:5), rows 2:4 all ranks; the dense LoRA per sample
    segments = [(0, 2, 2, 5, fast[0, 2:5]), (2, 4, 0, 9, fast[2])]
    with torch.no_grad():
        layer.set_segments(segments, W4[:, 2:3], batch=4)
        assert layer.plan == SEGMENTS and layer.mode == LOWRANK
        assert _close(layer(x), expected)
        # Composite-like: four one-sample segments, each with one LoRA (the dense one alone on sample 2)
        w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.8, 0.0, 0.0, 0.0], [0.0, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, -1.2]])
        f = _per_rank(w)
        layer.set_segments([(1, 2, 0, 2, f[1, 0:2]), (3, 4, 5, 9, f[3, 5:9])], w[:, 2:3], batch=4)
        assert _close(layer(x), _dense_reference(layer, deltas, x, w))
        with pytest.raises(RuntimeError, match="batch of 4"):
            layer(x[:2])
    layer.set_segments(segments, W4[:, 2:3], batch=4)  # with grad enabled it still computes (out of place)
    assert _close(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "linear2d", "conv"])
def test_plan_per_sample_equals_dense_reference_with_gradients(kind):
    layer, deltas, x = _layer(kind)
    w = W4.clone().requires_grad_(True)
    probe = torch.randn(_dense_reference(layer, deltas, x, W4).shape, generator=torch.Generator().manual_seed(3))
    expected = _dense_reference(layer, deltas, x, w)
    (expected * probe).sum().backward()
    grad_ref = w.grad.clone()
    w.grad = None
    with torch.no_grad():
        layer.set_per_sample(_per_rank(W4), W4[:, 2:3])
        assert layer.plan == PER_SAMPLE
        assert _close(layer(x), expected)
    layer.set_per_sample(_per_rank(w), w[:, 2:3])  # the gate trainer's path: the scales carry the graph
    out = layer(x)
    assert _close(out, expected)
    (out * probe).sum().backward()
    assert w.grad is not None and _close(w.grad, grad_ref, 1e-4)
    # the shared plan is differentiable in the weights too
    v = torch.tensor([0.8, -0.5, 0.3, 1.1], requires_grad=True)
    ref = _dense_reference(layer, deltas, x, v.expand(4, -1))
    (g_ref,) = torch.autograd.grad((ref * probe).sum(), v)
    layer.set_shared(_per_rank(v), v[2:3])
    (g,) = torch.autograd.grad((layer(x) * probe).sum(), v)
    assert _close(g, g_ref, 1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_patch_equals_dense_reference_and_restores_bit_exact(kind):
    layer, deltas, x = _layer(kind)
    w0 = layer.base.weight.detach().clone()
    w = torch.tensor([0.8, -0.5, 0.3, 1.1])
    with torch.no_grad():
        base_out = layer(x)
        for _ in range(50):
            layer.patch(_per_rank(w), w[2:3])
            assert layer.mode == PATCHED
            assert _close(layer(x), _dense_reference_with(w0, layer, deltas, x, w))
            layer.restore()
            assert torch.equal(layer.base.weight, w0)
        w3 = torch.tensor([0.0, 0.0, 0.4, -0.9])  # LoRA 3 (ranks 5:9) and the dense one
        layer.patch(_per_rank(w3), w3[2:3], ranks=(5, 9))
        assert _close(layer(x), _dense_reference_with(w0, layer, deltas, x, w3))
        layer.restore()
        assert torch.equal(layer.base.weight, w0)
        layer.set_off()
        assert torch.equal(layer(x), base_out)


def _dense_reference_with(w0, layer, deltas, x, w):
    weight = w0 + sum(w[i] * deltas[i] for i in range(len(w)))
    if layer.is_conv:
        return torch.nn.functional.conv2d(x, weight, layer.base.bias, layer.base.stride, layer.base.padding)
    return torch.nn.functional.linear(x, weight, layer.base.bias)


class _TwoRows(Schedule):
    """Different weights per CFG half: row 0 (uncond) and row 1 (cond), each ``{name: weight}``."""

    def __init__(self, uncond: dict, cond: dict):
        super().__init__({n: 1.0 for n in cond})
        self.rows = uncond, cond

    def weights(self, step, n_steps):
        return torch.stack([torch.tensor([row.get(n, 0.0) for n in self.names])[:, None] * self.table(step, n_steps)
                            for row in self.rows])

    def passes(self, step, n_steps, cfg):
        return [Pass("uncond", 0), Pass("cond", 1)]


@pytest.fixture(params=["cost_model", "segments", "per_sample"])
def plan_choice(request, monkeypatch):
    """Run under the cost model's choice, or force every multi-weight layer onto one plan."""
    if request.param != "cost_model":
        monkeypatch.setattr(AdaptedLayer, "segments_cheaper", lambda self, *a: request.param == "segments")
    return request.param


def _unet_plans(rt):
    return {layer.plan for layer in rt.layers.values() if layer.name.startswith("unet.") and layer.mode == LOWRANK}


def test_cfg_halves_with_different_weights_plain_and_dense(models, loras, runtime, plan_choice):
    unet = models["unet"]
    inputs = ff.unet_inputs(batch=4)
    uncond = {"a": 0.4, "c": 0.0, "dense": -0.7}  # c absent from the uncond half: its ranks are skipped there
    cond = {"a": 0.9, "c": 1.2, "dense": 0.5}
    ref_u = ff.run_unet(ff.reference({"unet": unet}, [(loras[n], w) for n, w in uncond.items()])["unet"], inputs)
    ref_c = ff.run_unet(ff.reference({"unet": unet}, [(loras[n], w) for n, w in cond.items()])["unet"], inputs)
    rt = runtime(cfg=True)
    for n in cond:
        rt.load(n, loras[n])
    rt.activate(list(cond), _TwoRows(uncond, cond))
    for _ in range(2):  # the second call hits the runtime's cache of the layers' plans
        out = ff.run_unet(unet, inputs)
        assert _max(out[:2], ref_u[:2]) < ATOL and _max(out[2:], ref_c[2:]) < ATOL
    plans = _unet_plans(rt)
    assert plans <= {SEGMENTS, PER_SAMPLE}
    if plan_choice == "segments":  # the dense LoRAs' layers stay per sample only where no fast LoRA is there
        assert SEGMENTS in plans
    elif plan_choice == "per_sample":
        assert plans == {PER_SAMPLE}
    # a uniform call afterwards (both halves alike) goes back to patched / shared layers and stays exact
    rt.activate(list(cond), _TwoRows(cond, cond))
    assert _max(ff.run_unet(unet, inputs), ref_c) < ATOL


class _PerStep(Schedule):
    """Weights ``{name: weight}`` per step, both CFG halves alike."""

    def __init__(self, steps: list[dict]):
        super().__init__({n: 1.0 for n in steps[0]})
        self.steps = steps

    def weights(self, step, n_steps):
        row = self.steps[step]
        return (torch.tensor([row[n] for n in self.names])[:, None] * self.table(step, n_steps))[None]


@pytest.mark.parametrize("lowrank", [False, True])
def test_uniform_weights_shared_or_patched_plain_and_dense(models, loras, runtime, monkeypatch, lowrank):
    """Every sample alike, weights changing each step: layers re-fold or run the shared low-rank plan."""
    unet = models["unet"]
    inputs = ff.unet_inputs(batch=2)
    monkeypatch.setattr(AdaptedLayer, "lowrank_cheaper", lambda self, *a: lowrank)
    steps = [{"a": 0.6, "b": 1.1, "dense": 0.8}, {"a": 0.3, "b": 1.1, "dense": 0.4},
             {"a": 0.3, "b": 0.0, "dense": 0.4}, {"a": -0.2, "b": 1.1, "dense": 0.0}, {"a": -0.2, "b": 1.1, "dense": 0.0}]
    expected = [ff.run_unet(ff.reference({"unet": unet}, [(loras[n], w) for n, w in weights.items()])["unet"], inputs)
                for weights in steps]  # before the runtime wraps (and patches) the model
    rt = runtime()
    names = list(steps[0])
    for n in names:
        rt.load(n, loras[n])
    rt.activate(names, _PerStep(steps))
    q = rt.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"]  # a (4 ranks), then b (8)
    for step in range(len(steps)):
        rt.set_step(step, len(steps))
        assert _max(ff.run_unet(unet, inputs), expected[step]) < ATOL, step
        if lowrank:  # only the non-zero LoRAs' ranks run: b is 0 at step 2
            assert q.plan == SHARED and q.shared_k == ((0, 4) if step == 2 else (0, 12)), step
    modes = {layer.mode for layer in rt.layers.values() if layer.name.startswith("unet.")}
    assert (LOWRANK in modes and PATCHED not in modes and _unet_plans(rt) == {SHARED}) if lowrank else PATCHED in modes
    rt.unfuse()  # back to the original weights, bit for bit
    assert all(torch.equal(layer.base.weight, layer.original) for layer in rt.layers.values() if layer.original is not None)


def test_composite_with_dense_loras(models, loras, runtime, plan_choice):
    unet = models["unet"]
    sample, t, ehs = ff.unet_inputs(batch=2)
    names = ["a", "c", "dense"]
    weights = {"a": 0.8, "c": -0.6, "dense": 0.9}
    with torch.no_grad():
        uncond = unet(sample[:1], t, encoder_hidden_states=ehs[:1]).sample
        conds = [ff.reference({"unet": unet}, [(loras[n], w)])["unet"](sample[1:], t, encoder_hidden_states=ehs[1:]).sample
                 for n, w in weights.items()]
    rt = runtime(cfg=True)
    for n in names:
        rt.load(n, loras[n])
    rt.activate(names, Composite(weights))
    out = ff.run_unet(unet, (sample, t, ehs))
    assert _max(out[:1], uncond) < ATOL and _max(out[1:], torch.stack(conds).mean(0)) < ATOL
    if plan_choice == "segments":
        seg = [layer for layer in rt.layers.values() if layer.plan == SEGMENTS]
        assert seg and all(b1 - b0 == 1 for layer in seg for b0, b1, *_ in layer.segments)


def test_gate_training_gradients_flow_through_per_sample_weights(models, loras, runtime):
    """The gated trainer's path: ``group.configure(w, one segment per sample)`` with grad on ``w``."""
    unet = models["unet"]
    sample, t, ehs = ff.unet_inputs(batch=2)
    rt = runtime()
    names = ["a", "c", "dense"]
    for n in names:
        rt.load(n, loras[n])
    rt.activate(names, Merge({n: 1.0 for n in names}))
    group = rt.groups["unet"]
    n_layers = len(rt.schedule.binding.unet_layers)
    base_w = torch.rand(2, len(names), n_layers, generator=torch.Generator().manual_seed(0)) + 0.2
    probe = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))

    def loss(w, grad=True):
        with torch.set_grad_enabled(grad):
            group.configure(w, [(0, 1), (1, 1)], False)
            return (type(unet).forward(unet, sample, t, encoder_hidden_states=ehs).sample * probe).sum()

    with torch.no_grad():
        teacher = loss(base_w, grad=False)  # a no-grad call (segments) between grad calls, as the trainer does
    w = base_w.clone().requires_grad_(True)
    value = loss(w)
    assert _max(value, teacher) < 1e-3 * (1 + teacher.abs().item())
    value.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert w.grad[:, 2].abs().sum() > 0  # the dense LoRA's weights get gradients too
    # a directional derivative agrees with a central difference of the no-grad forward
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    eps = 1e-2
    with torch.no_grad():
        fd = (loss(base_w + eps * d, False) - loss(base_w - eps * d, False)) / (2 * eps)
    analytic = (w.grad * d).sum()
    assert abs(fd - analytic) < 2e-2 * (1 + abs(analytic))
    unet.zero_grad(set_to_none=True)
