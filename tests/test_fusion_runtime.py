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
