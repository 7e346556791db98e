"""Fusion methods: LBW block weights, start/stop, B-LoRA, Merge options, Switch, Composite, plans, custom schedules."""
from __future__ import annotations

import copy

import pytest
import torch

import fusion_fixtures as ff
from fusion import (BLOCK_IDS, PRESETS, BlockWeightError, BlockWise, Composite, LoRARef, LoRARuntime, Merge,
                    MergeOptions, Plan, Schedule, Switch, block_id, build_schedule, layer_rule, parse_weights,
                    resolve_step)
from fusion.blockweights import BLOCKID12, BLOCKID17, BLOCKID20, BLOCKID26, DEFAULT_PRESETS, block_prefixes
from fusion.merging import merge_loras
from studio.library.canonical import module_shapes

ATOL = 1e-5

SDXL_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64, 128],
    layers_per_block=2, transformer_layers_per_block=[1, 2, 2], cross_attention_dim=64, attention_head_dim=[2, 4, 8],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=112, norm_num_groups=16,
)


@pytest.fixture(scope="module")
def unet():
    return ff.unet(0)


@pytest.fixture(scope="module")
def loras(unet):
    m = {"unet": unet}
    return {
        "a": ff.random_lora(m, rank=4, seed=1, alpha=2.0),
        "b": ff.random_lora(m, rank=4, seed=2, select=ff.is_attention),
        "c": ff.random_lora(m, rank=8, seed=3, select=ff.is_attention, alpha=4.0),
    }


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


def _blocks(names):
    return {block_id(n) for n in names} - {None}


# ---------------------------------------------------------------- LoRA Block Weight


def test_default_presets_are_lbws_table():
    assert list(DEFAULT_PRESETS) == ["NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"]
    assert DEFAULT_PRESETS["MIDD"] == "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"
    assert PRESETS["NMID"] == "0,1,1,1,1,1,1,0,1,1,1,1,1,1,1,1,1"  # as shipped in lbwpresets.txt


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_maps_to_26_blocks(name):
    weights = parse_weights(name)
    assert len(weights) == 26
    values = [float(v) for v in PRESETS[name].split(",")]
    assert [weights[BLOCKID26.index(b)] for b in BLOCKID17] == values
    assert all(weights[i] == 0 for i, b in enumerate(BLOCKID26) if b not in BLOCKID17)


@pytest.mark.parametrize("n", sorted(BLOCK_IDS))
def test_each_length_lands_on_its_blocks(n):
    values = [i + 1.5 for i in range(n)]
    weights = parse_weights(",".join(map(str, values)))
    for block, value in zip(BLOCK_IDS[n], values):
        assert weights[BLOCKID26.index(block)] == value
    assert sum(1 for w in weights if w) == n  # the blocks it does not name are 0, as in LBW's to26


@pytest.mark.parametrize("spec, message", [
    ("1,0,0", "has 3 values; LBW takes 17 or 26 \\(SD1.5\\) or 12 or 20 \\(SDXL\\)"),
    (",".join(["1"] * 18), "has 18 values"),
    ("NOPE", "unknown block-weight preset 'NOPE'"),
    (",".join(["R"] * 17), "random/dynamic value 'R' is not supported"),
    (",".join(["1"] * 16 + ["x"]), "'x' is not a number"),
])
def test_bad_weight_strings_say_why(spec, message):
    with pytest.raises(BlockWeightError, match=message):
        parse_weights(spec)


def test_tinyworld_blocks_follow_sd15(unet):
    names = list(module_shapes({"unet": unet}))
    attention = _blocks(n for n in names if ".attentions." in n)
    assert attention == set(BLOCKID17[1:])  # the 17-value form names SD1.5's blocks with attention
    assert _blocks(names) == set(BLOCKID26[1:])
    expected = {
        "unet.conv_in": "IN00",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
        "unet.down_blocks.0.resnets.1.conv1": "IN02",
        "unet.down_blocks.0.downsamplers.0.conv": "IN03",
        "unet.down_blocks.3.resnets.1.time_emb_proj": "IN11",
        "unet.mid_block.resnets.1.conv2": "M00",
        "unet.up_blocks.0.resnets.2.conv_shortcut": "OUT02",
        "unet.up_blocks.0.upsamplers.0.conv": "OUT02",
        "unet.up_blocks.1.attentions.0.proj_out": "OUT03",
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": "OUT11",
        "unet.time_embedding.linear_1": None,
        "unet.conv_out": None,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "BASE",
        "text_encoder_2.text_projection": "BASE",
    }
    assert {n: block_id(n) for n in expected} == expected
    for n in names:
        b = block_id(n)
        if b is not None:
            assert any(n == p or n.startswith(p + ".") for p in block_prefixes(b, n_down=4)), (n, b)


def test_sdxl_blocks():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**SDXL_TINY)
    names = list(module_shapes({"unet": sdxl}))
    assert _blocks(n for n in names if ".attentions." in n) == set(BLOCKID12[1:])  # 12 values: SDXL's attention
    assert _blocks(names) == set(BLOCKID20[1:])
    assert block_id("unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k") == "OUT01"
    assert block_id("unet.down_blocks.2.attentions.1.proj_in") == "IN08"
    assert block_id("unet.add_embedding.linear_1") is None
    for n in names:
        b = block_id(n)
        if b is not None:
            assert any(n == p or n.startswith(p + ".") for p in block_prefixes(b, n_down=3)), (n, b)


def test_blora_parts():
    content, style = layer_rule("BLORA_CONTENT"), layer_rule("BLORA_STYLE")
    q0 = "unet.up_blocks.0.attentions.0.transformer_blocks.3.attn1.to_q"
    q1 = "unet.up_blocks.0.attentions.1.transformer_blocks.3.attn1.to_q"
    assert (content(q0), content(q1), style(q0), style(q1)) == (1.0, 0.0, 0.0, 1.0)
    assert layer_rule("BLORA")(q1) == 1.0 and content("text_encoder.text_model.encoder.layers.0.mlp.fc1") == 0.0
    assert content("unet.up_blocks.0.attentions.10.proj_in") == 0.0


@pytest.mark.parametrize("strategy", ["auto", "lowrank"])
def test_block_weights_in_the_runtime(unet, loras, runtime, strategy):
    spec = "0.5," + ",".join(str(i / 25) for i in range(1, 26))  # 26 values: resnet-only slots too
    rules = {"a": layer_rule(spec), "b": layer_rule("MIDD")}
    ref = ff.reference({"unet": unet}, [(loras["a"], lambda n: 0.8 * rules["a"](n)),
                                        (loras["b"], lambda n: -0.6 * rules["b"](n))])["unet"]
    inputs = ff.unet_inputs()
    expected = ff.run_unet(ref, inputs)
    rt = runtime(strategy=strategy)
    rt.load("a", loras["a"]), rt.load("b", loras["b"])
    rt.activate(None, BlockWise([LoRARef("a", 0.8, lbw=spec), LoRARef("b", -0.6, lbw="MIDD")]))
    assert _max(ff.run_unet(unet, inputs), expected) < ATOL


def test_start_stop_steps(unet, loras, runtime):
    assert [resolve_step(v, 20) for v in (None, 0, 5, 0.25, 0.01)] == [None, 0, 5, 5, 1]
    inputs = ff.unet_inputs()
    base = ff.run_unet(unet, inputs)
    with_a = ff.run_unet(ff.reference({"unet": unet}, [(loras["a"], 0.7)])["unet"], inputs)
    rt = runtime()
    rt.load("a", loras["a"])
    schedule = rt.activate(None, BlockWise([LoRARef("a", 0.7, start=2, stop=4)]))
    assert [schedule.gate(s, 6).item() for s in range(6)] == [0, 1, 1, 0, 0, 0]  # 1-indexed steps 2 and 3
    for step in range(6):
        rt.set_step(step, 6)
        assert _max(ff.run_unet(unet, inputs), with_a if step in (1, 2) else base) < ATOL, step
    frac = BlockWise([LoRARef("a", start=0.5)])
    rt.activate(None, frac)
    assert [frac.gate(s, 10).item() for s in range(10)] == [0] * 4 + [1] * 6


# ---------------------------------------------------------------- Merge options


def test_cat_and_svd_equal_the_weighted_sum(unet, loras, runtime):
    inputs = ff.unet_inputs()
    weights = {"b": 0.7, "c": -0.5}
    rt = runtime()
    rt.load("b", loras["b"]), rt.load("c", loras["c"])
    rt.activate(["b", "c"], Merge(weights))
    linear = ff.run_unet(unet, inputs)
    rt.activate(["b", "c"], Merge(weights, combination="cat"))
    assert rt.active_names == ["cat(b+c)"]
    assert {m.rank for m in rt.schedule.binding.loras["cat(b+c)"].modules.values()} == {12}
    assert _max(ff.run_unet(unet, inputs), linear) < ATOL
    rt.activate(["b", "c"], Merge(weights, combination="svd", rank=12))
    assert _max(ff.run_unet(unet, inputs), linear) < 1e-4
    rt.activate(["b", "c"], Merge(weights, combination="svd", rank=2))
    assert _max(ff.run_unet(unet, inputs), linear) > 1e-3


def test_peft_merges_match_merge_utils(unet, loras):
    from peft.utils import merge_utils as mu

    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    b, c = loras["b"], ff.random_lora({"unet": unet}, rank=4, seed=9, select=lambda n: n == module, alpha=1.0)
    w = {"b": 0.8, "c": 0.6}

    def merged(combination, **kw):
        out = merge_loras([b, c], ["b", "c"], lambda n, m: w[n], combination, **kw)
        return out.modules[module]

    mb, mc = b.modules[module], c.modules[module]
    ws = [w["b"] * mb.scale, w["c"] * mc.scale]
    ties = merged("ties", density=0.5)
    expected_a = mu.ties([mb.factors["down"], mc.factors["down"]], torch.tensor([x ** 0.5 for x in ws]), 0.5)
    expected_b = mu.ties([mb.factors["up"], mc.factors["up"]], torch.tensor([x ** 0.5 for x in ws]), 0.5)
    assert torch.allclose(ties.factors["down"], expected_a) and torch.allclose(ties.factors["up"], expected_b)
    d1, d2, d3 = (merged("dare_linear", density=0.5, seed=s).factors["down"] for s in (0, 0, 1))
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
    deltas = [mb.delta_weight(), mc.delta_weight()]
    full = merged("magnitude_prune_svd", density=0.3, rank=64)
    dense = mu.magnitude_prune(deltas, torch.tensor([w["b"], w["c"]]), 0.3)
    assert torch.allclose(full.delta_weight(), dense, atol=1e-5)
    assert merged("ties_svd", density=0.5).rank == 4  # default rank: the largest input rank
    with pytest.raises(ValueError, match="needs a density"):
        merged("dare_ties")


def test_merge_refusals(unet, loras):
    from studio.library.canonical import resolve_module

    dense = ff.dense_kinds_lora({"unet": unet}, seed=1)
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ValueError, match="combination='svd'"):
        merge_loras([dense, loras["a"]], ["d", "a"], lambda n, m: 1.0, "cat")
    with pytest.raises(ValueError, match="equal ranks.*_svd"):
        merge_loras([loras["b"], loras["c"]], ["b", "c"], lambda n, m: 1.0, "ties", density=0.5)
    svd = merge_loras([dense, loras["a"]], ["d", "a"], lambda n, m: 1.0, "svd", rank=64,
                      base_weight=lambda n: resolve_module({"unet": unet}, n).weight.detach())
    assert svd.modules[module].kind == "lora"
    with pytest.raises(ValueError, match="start/stop"):
        Merge([LoRARef("a", stop=5)])
    with pytest.raises(ValueError, match="unknown merge combination"):
        Merge({"a": 1.0}, combination="average")
    with pytest.raises(ValueError, match="needs a density"):
        Merge({"a": 1.0}, combination="dare_ties")
    assert Merge({"a": 1.0}, options=MergeOptions("ties", density=0.3)).combination == "ties"
    with pytest.raises(ValueError, match="not both"):
        Merge({"a": 1.0}, options=MergeOptions("cat"), rank=4)


# ---------------------------------------------------------------- Switch and Composite


def test_switch_order_and_timing():
    refs = [LoRARef("bg", category="background"), LoRARef("hero", category="character"), LoRARef("hat")]
    s = Switch(refs, tau=3)
    assert s.order == ["hero", "bg", "hat"]
    assert [s.active(i) for i in range(10)] == ["hero"] * 3 + ["bg"] * 3 + ["hat"] * 3 + ["hero"]
    ref = Switch(refs, tau=3, reference_timing=True)  # the reference callback switches after step k*tau
    assert [ref.active(i) for i in range(8)] == ["hero"] * 4 + ["bg"] * 3 + ["hat"]
    assert Switch(refs, tau=1, order=["hat", "bg", "hero"]).active(0) == "hat"
    with pytest.raises(ValueError, match="distinct"):
        Switch(refs, order=["hat", "hat"])


def test_switch_and_composite_weights(unet, loras, runtime):
    rt = runtime()
    for n in "abc":
        rt.load(n, loras[n])
    switch = rt.activate(None, Switch([LoRARef("a", 0.5), LoRARef("b", 0.8, category="character"), LoRARef("c")],
                                      tau=2))
    w = switch.weights(2, 10)
    assert w.shape == (1, 3, len(switch.binding.unet_layers))
    assert w[0, 0].abs().sum() > 0 and w[0, 1:].abs().sum() == 0  # steps 2-3: the second in order, "a"
    comp = rt.activate(None, Composite({"a": 0.5, "b": 0.8, "c": 1.0}))
    w = comp.weights(0, 10)
    assert w.shape[:2] == (4, 3) and w[0].abs().sum() == 0
    assert all((w[1 + i].abs().sum(1) > 0).tolist() == [j == i for j in range(3)] for i in range(3))
    assert [p.branch for p in comp.passes(0, 10, cfg=True)] == ["uncond", "cond", "cond", "cond"]
    assert [p.row for p in comp.passes(0, 10, cfg=False)] == [1, 2, 3]
    per = Composite(["a", "b"], uncond="per_lora")
    rt.activate(None, per)
    assert [(p.branch, p.row) for p in per.passes(0, 5, True)] == [("uncond", 1), ("uncond", 2), ("cond", 1), ("cond", 2)]


# ---------------------------------------------------------------- plans and custom schedules


def test_plans_build_schedules():
    refs = [LoRARef("a", 0.8, lbw="MIDD", category="character"), LoRARef("b", 0.5, start=3, stop=0.75)]
    for method, params, cls in [("blockwise", {}, BlockWise), ("switch", {"tau": 4}, Switch),
                                ("composite", {"uncond": "merge"}, Composite)]:
        plan = Plan(loras=refs, method=method, params=params)
        assert Plan.from_dict(plan.to_dict()) == plan and Plan.from_json(plan.to_json()) == plan
        assert type(build_schedule(plan)) is cls
    assert build_schedule(Plan([LoRARef("a")], "merge", {"combination": "ties", "density": 0.4})).combination == "ties"
    with pytest.raises(ValueError, match="start/stop"):
        build_schedule(Plan(loras=refs, method="merge"))
    with pytest.raises(ValueError, match="bad parameters"):
        build_schedule(Plan(loras=refs, method="switch", params={"tua": 3}))
    with pytest.raises(ValueError, match="unknown fusion method"):
        Plan(loras=refs, method="average")
    with pytest.raises(ValueError, match="more than once"):
        Plan(loras=[LoRARef("a"), LoRARef("a")])


class _Ramp(Schedule):
    """Gated-fusion-shaped: a different weight per layer and per step (deeper layers ramp later)."""

    def weights(self, step, n_steps):
        depth = torch.linspace(0, 0.5, len(self.binding.unet_layers))
        ramp = torch.clamp(step / n_steps - depth, min=0)
        return (self.table(step, n_steps) * ramp[None])[None]


@pytest.mark.parametrize("strategy", ["auto", "lowrank"])
def test_per_layer_per_step_weights(unet, loras, runtime, strategy):
    inputs = ff.unet_inputs()
    clean = {"unet": copy.deepcopy(unet)}  # references come from an unwrapped copy
    rt = runtime(strategy=strategy)
    rt.load("b", loras["b"]), rt.load("c", loras["c"])
    schedule = rt.activate(None, _Ramp({"b": 1.0, "c": -0.7}))
    layers = schedule.binding.unet_layers
    for step in (0, 2, 3, 1):
        w = schedule.weights(step, 4)[0]
        ref = ff.reference(clean, [(loras[n], lambda m, i=i: float(w[i, layers.index(m)]))
                                            for i, n in enumerate(["b", "c"])])["unet"]
        rt.set_step(step, 4)
        assert _max(ff.run_unet(unet, inputs), ff.run_unet(ref, inputs)) < ATOL, step


# ---------------------------------------------------------------- SDXL layout: B-LoRA and batched passes


def test_sdxl_unet_blora_and_composite():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    sdxl = UNet2DConditionModel(**SDXL_TINY).eval().double()  # float64: strong random LoRAs amplify rounding
    clean = {"unet": copy.deepcopy(sdxl)}
    up0 = lambda n: n.startswith("unet.up_blocks.0.attentions.")  # noqa: E731  (what a B-LoRA trains)
    dog = ff.random_lora(clean, rank=4, seed=1, select=up0, strength=2.0)
    ink = ff.random_lora(clean, rank=4, seed=2, select=ff.is_attention, strength=2.0)
    g = torch.Generator().manual_seed(0)
    sample, ehs = torch.randn(4, 4, 16, 16, generator=g).double(), torch.randn(4, 77, 64, generator=g).double()
    added = {"text_embeds": torch.randn(4, 64, generator=g).double(), "time_ids": torch.randn(4, 6, generator=g).double()}

    def run(model, rows=slice(None)):
        with torch.no_grad():
            return model(sample[rows], 300, encoder_hidden_states=ehs[rows],
                         added_cond_kwargs={k: v[rows] for k, v in added.items()}).sample

    content = layer_rule("BLORA_CONTENT")
    expected = run(ff.reference(clean, [(dog, content)])["unet"])
    rt = LoRARuntime(unet=sdxl, cfg=True)
    try:
        rt.load("dog", dog), rt.load("ink", ink)
        rt.activate(None, BlockWise([LoRARef("dog", lbw="BLORA_CONTENT")]))
        assert _max(run(sdxl), expected) < ATOL
        assert _max(expected, run(clean["unet"])) > 1e-3
        rt.activate(None, Composite({"dog": 1.0, "ink": 0.5}))
        out = run(sdxl)
        singles = [ff.reference(clean, [(dog, 1.0)])["unet"], ff.reference(clean, [(ink, 0.5)])["unet"]]
        conds = torch.stack([run(m, slice(2, 4)) for m in singles]).mean(0)
        assert _max(out[:2], run(clean["unet"], slice(0, 2))) < ATOL and _max(out[2:], conds) < ATOL
    finally:
        rt.remove()
