"""Readers, writers, naming, detection, delta formulas and errors of studio.library."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.library import (
    CorruptFileError,
    FamilyMismatchError,
    LoRA,
    LoRAFileError,
    ModuleLoRA,
    NonFiniteError,
    PickleRefusedError,
    ShapeMismatchError,
    UnknownFormatError,
    detect_family,
    detect_format,
    inspect_file,
    read_lora,
    write_lora,
)
from studio.library.naming import kohya_to_path, path_to_kohya
from library_fixtures import (
    SDXL_SGM,
    base_shapes,
    kohya_name,
    meta_models,
    random_modules,
    write_diffusers,
    write_kohya,
)

FAMILIES = ["tinyworld", "sd15", "sdxl"]


def assert_same_state_dict(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# -- naming ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_name_survives_kohya_naming(family):
    for path in base_shapes(family):
        assert kohya_to_path(path_to_kohya(path, family)) == path


def test_sdxl_sgm_names_by_hand():
    for sgm, diffusers_path in SDXL_SGM.items():
        assert kohya_to_path(f"lora_unet_{sgm}") == f"unet.{diffusers_path}"
        assert path_to_kohya(f"unet.{diffusers_path}", "sdxl") == f"lora_unet_{sgm}"
    assert kohya_to_path("lora_te2_text_model_encoder_layers_3_mlp_fc1") == "text_encoder_2.text_model.encoder.layers.3.mlp.fc1"
    assert kohya_to_path("lora_unet_input_blocks_99_7_foo") is None


def test_sdxl_sgm_names_agree_with_diffusers_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    unet = meta_models("sdxl")["unet"]
    paths = [p.removeprefix("unet.") for p in base_shapes("sdxl") if p.startswith("unet.")]
    sd = {f"{path_to_kohya('unet.' + p, 'sdxl')}.lora_down.weight": p for p in paths}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), unet.config)
    assert len(mapped) == len(paths) == 794
    for key, path in mapped.items():
        theirs = _convert_unet_lora_key(key).replace(".processor", "").replace("to_out_lora.down.weight", "to_out.0")
        theirs = re.sub(r"(to_[qkv])_lora\.down\.weight$", r"\1", theirs).removesuffix(".lora.down.weight")
        assert theirs == path


# -- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_round_trip_is_exact(tmp_path, family):
    original = write_kohya(tmp_path / "a.safetensors", family)
    lora = read_lora(tmp_path / "a.safetensors", family=family, base_shapes=base_shapes(family))
    assert lora.source_format == "kohya" and lora.family == family
    assert "locon" in lora.kinds() and any("mid" in m.factors for m in lora.modules.values())
    write_lora(lora, tmp_path / "b.safetensors", format="kohya")
    assert_same_state_dict(original, load_file(tmp_path / "b.safetensors"))
    assert read_lora(tmp_path / "b.safetensors").metadata == lora.metadata


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_round_trip_is_exact(tmp_path, family):
    original = write_diffusers(tmp_path / "a.safetensors", family)
    lora = read_lora(tmp_path / "a.safetensors", family=family, base_shapes=base_shapes(family))
    assert lora.source_format == "diffusers"
    write_lora(lora, tmp_path / "b.safetensors", format="diffusers")
    assert_same_state_dict(original, load_file(tmp_path / "b.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_and_diffusers_give_the_same_deltas(tmp_path, family):
    modules = random_modules(family, seed=3)
    write_kohya(tmp_path / "k.safetensors", family, seed=3)
    kohya = read_lora(tmp_path / "k.safetensors")
    no_tucker = LoRA({n: m for n, m in kohya.modules.items() if "mid" not in m.factors}, kohya.family, kohya.metadata)
    write_lora(no_tucker, tmp_path / "d.safetensors", format="diffusers")
    diffusers = read_lora(tmp_path / "d.safetensors")
    assert set(diffusers.modules) == set(no_tucker.modules)
    for name, module in no_tucker.modules.items():
        assert torch.equal(module.delta_weight(), diffusers.modules[name].delta_weight()), name
        alpha = modules[name]["alpha"]
        assert module.scale == (alpha / module.rank if alpha else 1.0)
    write_lora(diffusers, tmp_path / "k2.safetensors", format="kohya")
    back = read_lora(tmp_path / "k2.safetensors")
    for name, module in no_tucker.modules.items():
        assert torch.equal(module.delta_weight(), back.modules[name].delta_weight()), name
    assert back.metadata == kohya.metadata


def test_half_precision_alpha_round_trip(tmp_path):
    original = write_kohya(tmp_path / "a.safetensors", "tinyworld", dtype=torch.float16)
    write_lora(read_lora(tmp_path / "a.safetensors"), tmp_path / "b.safetensors", format="kohya")
    assert_same_state_dict(original, load_file(tmp_path / "b.safetensors"))


def test_old_diffusers_format(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": torch.randn(2, 128, generator=g),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": torch.randn(32, 2, generator=g),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.randn(2, 32, generator=g),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.randn(32, 2, generator=g),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.randn(2, 128, generator=g),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.randn(128, 2, generator=g),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.randn(2, 128, generator=g),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.randn(512, 2, generator=g),
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.randn(2, 32, 3, 3, generator=g),
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": torch.randn(32, 2, 1, 1, generator=g),
    }
    save_file(sd, tmp_path / "old.safetensors")
    lora = read_lora(tmp_path / "old.safetensors", family="tinyworld", base_shapes=base_shapes("tinyworld"))
    assert lora.source_format == "diffusers_old" and lora.family == "tinyworld"
    assert sorted(lora.modules) == sorted([
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        "unet.down_blocks.0.resnets.0.conv1",
    ])
    module = lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"
    assert torch.equal(module.delta_weight(), sd[f"{key}.up.weight"] @ sd[f"{key}.down.weight"])


# -- delta formulas against hand computation ----------------------------------------------------------------


def test_lora_and_locon_deltas():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    m = ModuleLoRA("lora", {"down": down, "up": up}, alpha=1.5)
    hand = torch.tensor([[sum(up[i, r] * down[r, j] for r in range(3)) * 1.5 / 3 for j in range(5)] for i in range(4)])
    torch.testing.assert_close(m.delta_weight(), hand)
    assert ModuleLoRA("lora", {"down": down, "up": up}, alpha=0.0).scale == 1.0  # kohya: alpha 0 means rank

    down, up = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    conv = ModuleLoRA("locon", {"down": down, "up": up}, alpha=1.0)
    hand = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * 0.5
    torch.testing.assert_close(conv.delta_weight(), hand)

    # Tucker LoCon: ΔW[o,i,k,l] = Σ_ab up[o,a] mid[a,b,k,l] down[b,i]
    down, mid, up = torch.randn(2, 3, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    tucker = ModuleLoRA("locon", {"down": down, "mid": mid, "up": up}, alpha=2.0)
    hand = torch.zeros(4, 3, 3, 3)
    for o, i, k, l, a, b in torch.cartesian_prod(*map(torch.arange, (4, 3, 3, 3, 2, 2))).tolist():
        hand[o, i, k, l] += up[o, a, 0, 0] * mid[a, b, k, l] * down[b, i, 0, 0]
    torch.testing.assert_close(tucker.delta_weight(), hand)


def test_loha_delta():
    g = torch.Generator().manual_seed(1)
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=g) for s in ((4, 2), (2, 6), (4, 2), (2, 6)))
    m = ModuleLoRA("loha", {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b}, alpha=1.0)
    hand = torch.tensor([[(w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * 0.5 for j in range(6)] for i in range(4)])
    torch.testing.assert_close(m.delta_weight(), hand)
    # a flattened conv LoHa takes the base weight's shape when given one
    assert m.delta_weight(torch.zeros(4, 6, 1, 1)).shape == (4, 6, 1, 1)

    # Tucker LoHa: each half is Σ_ab t[a,b,k,l] w_a[a,o] w_b[b,i]
    t1, t2 = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=g) for s in ((2, 4), (2, 5), (2, 4), (2, 5)))
    m = ModuleLoRA("loha", {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b, "t1": t1, "t2": t2}, alpha=4.0)
    half = lambda t, a, b: torch.einsum("abkl,ao,bi->oikl", t, a, b)  # noqa: E731
    torch.testing.assert_close(m.delta_weight(), half(t1, w1a, w1b) * half(t2, w2a, w2b) * 2.0)


def test_lokr_delta():
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(2, 3, generator=g)
    w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    m = ModuleLoRA("lokr", {"w1": w1, "w2a": w2a, "w2b": w2b}, alpha=1.0)
    w2 = w2a @ w2b
    hand = torch.zeros(8, 15)
    for a in range(2):
        for c in range(3):
            hand[a * 4 : a * 4 + 4, c * 5 : c * 5 + 5] = w1[a, c] * w2 * 0.5
    torch.testing.assert_close(m.delta_weight(), hand)
    assert m.rank == 2 and m.scale == 0.5

    full = ModuleLoRA("lokr", {"w1": w1, "w2": w2}, alpha=7.0)  # both factors full: scale 1
    assert full.rank is None
    torch.testing.assert_close(full.delta_weight(), hand * 2)

    w1a, w1b = torch.randn(2, 1, generator=g), torch.randn(1, 3, generator=g)
    conv_w2 = torch.randn(4, 5, 3, 3, generator=g)
    m = ModuleLoRA("lokr", {"w1a": w1a, "w1b": w1b, "w2": conv_w2}, alpha=2.0)
    w1 = w1a @ w1b
    hand = torch.zeros(8, 15, 3, 3)
    for a in range(2):
        for c in range(3):
            hand[a * 4 : a * 4 + 4, c * 5 : c * 5 + 5] = w1[a, c] * conv_w2 * 2.0
    torch.testing.assert_close(m.delta_weight(), hand)

    t2, w2a, w2b = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)
    m = ModuleLoRA("lokr", {"w1": w1, "w2a": w2a, "w2b": w2b, "t2": t2}, alpha=1.0)
    w2 = torch.einsum("abkl,ao,bi->oikl", t2, w2a, w2b)
    hand = torch.zeros(8, 15, 3, 3)
    for a in range(2):
        for c in range(3):
            hand[a * 4 : a * 4 + 4, c * 5 : c * 5 + 5] = w1[a, c] * w2 * 0.5
    torch.testing.assert_close(m.delta_weight(), hand)


def test_dora_output_axis_matches_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    net = Net()
    base = {n: getattr(net, n).weight.detach().clone() for n in ("lin", "conv")}
    peft_net = get_peft_model(net, LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "conv"], use_dora=True))
    modules = {}
    for name in ("lin", "conv"):
        layer = getattr(peft_net.base_model.model, name)
        with torch.no_grad():
            layer.lora_A["default"].weight.normal_()
            layer.lora_B["default"].weight.normal_()
            layer.lora_magnitude_vector["default"].weight.uniform_(0.5, 2)
        dora = layer.lora_magnitude_vector["default"].weight.detach().clone()
        modules[name] = ModuleLoRA(
            "lora" if name == "lin" else "locon",
            {"down": layer.lora_A["default"].weight.detach().clone(), "up": layer.lora_B["default"].weight.detach().clone()},
            alpha=3.0, dora_scale=dora.reshape(dora.numel(), *[1] * (base[name].dim() - 1)),
        )
    merged = peft_net.merge_and_unload()
    for name, module in modules.items():
        assert module.dora_on_output
        torch.testing.assert_close(base[name] + module.delta_weight(base[name]), getattr(merged, name).weight, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="base_weight"):
        modules["lin"].delta_weight()


def test_dora_input_axis_lycoris(tmp_path):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 6, generator=g)
    down, up, scale = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), torch.rand(1, 6, generator=g) + 0.5
    m = ModuleLoRA("lora", {"down": down, "up": up}, alpha=1.0, dora_scale=scale)
    assert not m.dora_on_output
    v = w + up @ down * 0.5
    hand = torch.stack([v[:, j] / v[:, j].norm() * scale[0, j] for j in range(6)], dim=1)
    torch.testing.assert_close(w + m.delta_weight(w), hand)

    sd = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": scale}
    save_file(sd, tmp_path / "dora.safetensors")
    lora = read_lora(tmp_path / "dora.safetensors")
    assert lora.has_dora
    torch.testing.assert_close(lora.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].delta_weight(w), hand - w)
    write_lora(lora, tmp_path / "back.safetensors", format="kohya")
    assert_same_state_dict(sd, load_file(tmp_path / "back.safetensors"))
    with pytest.raises(ValueError, match="input-axis DoRA"):
        write_lora(lora, tmp_path / "d.safetensors", format="diffusers")


def test_lycoris_files_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    loha = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loha_conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    lokr = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    lokr_conv = "lora_unet_down_blocks_0_resnets_0_conv2"
    sd = {
        f"{loha}.hada_w1_a": r(32, 4), f"{loha}.hada_w1_b": r(4, 128), f"{loha}.hada_w2_a": r(32, 4),
        f"{loha}.hada_w2_b": r(4, 128), f"{loha}.alpha": torch.tensor(2.0), f"{loha}.dora_scale": r(1, 128),
        f"{loha_conv}.hada_w1_a": r(32, 2), f"{loha_conv}.hada_w1_b": r(2, 288), f"{loha_conv}.hada_w2_a": r(32, 2),
        f"{loha_conv}.hada_w2_b": r(2, 288), f"{loha_conv}.alpha": torch.tensor(1.0),
        f"{lokr}.lokr_w1": r(8, 8), f"{lokr}.lokr_w2_a": r(64, 4), f"{lokr}.lokr_w2_b": r(4, 16), f"{lokr}.alpha": torch.tensor(4.0),
        f"{lokr_conv}.lokr_w1_a": r(4, 1), f"{lokr_conv}.lokr_w1_b": r(1, 4), f"{lokr_conv}.lokr_w2_a": r(2, 8),
        f"{lokr_conv}.lokr_w2_b": r(2, 8), f"{lokr_conv}.lokr_t2": r(2, 2, 3, 3), f"{lokr_conv}.alpha": torch.tensor(1.0),
    }
    save_file(sd, tmp_path / "lyco.safetensors", metadata={"ss_network_module": "lycoris.kohya"})
    lora = read_lora(tmp_path / "lyco.safetensors", family="tinyworld", base_shapes=base_shapes("tinyworld"))
    assert lora.kinds() == ["loha", "lokr"] and lora.family == "tinyworld"
    conv = lora.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.shape == (32, 288) and conv.delta_weight(torch.zeros(32, 32, 3, 3)).shape == (32, 32, 3, 3)
    assert lora.modules["unet.down_blocks.0.resnets.0.conv2"].shape == (32, 32, 3, 3)
    assert lora.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"].shape == (512, 128)
    write_lora(lora, tmp_path / "back.safetensors", format="kohya")
    assert_same_state_dict(sd, load_file(tmp_path / "back.safetensors"))
    with pytest.raises(ValueError, match="format='kohya'"):
        write_lora(lora, tmp_path / "d.safetensors", format="diffusers")
    report = inspect_file(tmp_path / "lyco.safetensors")
    assert report.kinds == ["loha", "lokr"] and report.dora and report.ranks == [1, 2, 4]


# -- detection ---------------------------------------------------------------------------------------------


def test_detect_format():
    assert detect_format(["lora_unet_x.lora_down.weight"]) == "kohya"
    assert detect_format(["lora_te1_x.hada_w1_a"]) == "kohya"
    assert detect_format(["unet.a.to_q.lora_A.weight"]) == "diffusers"
    assert detect_format(["unet.a.processor.to_q_lora.down.weight"]) == "diffusers_old"
    assert detect_format(["unet.a.to_q.lora.down.weight"]) == "diffusers_old"
    assert detect_format(["model.diffusion_model.input_blocks.0.0.weight"]) == "unknown"


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family_from_shapes(tmp_path, family):
    sd = write_kohya(tmp_path / "a.safetensors", family, metadata={})
    assert detect_family({k: tuple(v.shape) for k, v in sd.items()}) == family
    sd = write_diffusers(tmp_path / "b.safetensors", family)
    assert detect_family({k: tuple(v.shape) for k, v in sd.items()}) == family


def test_detect_family_other_evidence():
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    te_only = {f"lora_te_{q.replace('.', '_')}.lora_down.weight": (4, 768), f"lora_te_{q.replace('.', '_')}.lora_up.weight": (768, 4)}
    assert detect_family(te_only) == "sd15"
    assert detect_family({k.replace("lora_te_", "lora_te1_"): v for k, v in te_only.items()}) == "sdxl"
    assert detect_family({f"text_encoder_2.{q}.lora_A.weight": (4, 1280), f"text_encoder_2.{q}.lora_B.weight": (1280, 4)}) == "sdxl"
    self_attn = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 1280),
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": (1280, 4)}
    assert detect_family(self_attn) == "unknown"
    assert detect_family(self_attn, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert detect_family(self_attn, {"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd15"
    sd2 = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024),
           "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (1280, 4)}
    assert detect_family(sd2, {"ss_base_model_version": "sd_v1"}) == "unknown"  # tensors win over metadata


def test_inspect_report(tmp_path):
    write_kohya(tmp_path / "style.safetensors", "sdxl")
    report = inspect_file(tmp_path / "style.safetensors")
    assert (report.format, report.family, report.kinds) == ("kohya", "sdxl", ["locon", "lora"])
    assert report.ranks == [2, 4] and report.alphas == [1.0, 2.0, 4.0]
    assert report.components == {"text_encoder": 2, "text_encoder_2": 2, "unet": 20}
    # "cat" tags 7 of 10 captions: data, not the activation tag (kohya: the tag on every caption)
    assert report.trigger_words == ["zqx style", "blue glow"]
    text = str(report)
    for expected in ("style.safetensors", "kohya", "sdxl", "text_encoder_2 2", "zqx style", "ss_output_name = test_lora"):
        assert expected in text


def test_inspect_reads_no_tensor_data(tmp_path, monkeypatch):
    write_diffusers(tmp_path / "a.safetensors", "sd15")
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("loaded tensors"))
    report = inspect_file(tmp_path / "a.safetensors")
    assert report.format == "diffusers" and report.family == "sd15" and report.alphas == [1.0, 2.0, 4.0]


# -- errors ------------------------------------------------------------------------------------------------


def expect_error(cls, path, **kw) -> LoRAFileError:
    with pytest.raises(cls) as info:
        read_lora(path, **kw)
    err = info.value
    assert isinstance(err, LoRAFileError) and err.path == str(path) and err.reason and err.fix
    assert str(path) in str(err) and "fix:" in str(err)
    return err


def test_corrupt_files(tmp_path):
    write_kohya(tmp_path / "good.safetensors", "tinyworld")
    data = (tmp_path / "good.safetensors").read_bytes()
    cases = {"truncated": data[: len(data) // 2], "empty": b"", "tiny": b"\x01\x02", "garbage": b"x" * 200,
             "bad_json": data[:8] + b"{" * 10 + data[18:]}
    for name, content in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        expect_error(CorruptFileError, tmp_path / f"{name}.safetensors")
    assert "truncated" in expect_error(CorruptFileError, tmp_path / "truncated.safetensors").reason


def test_pickles_are_refused_unless_allowed(tmp_path):
    sd = write_kohya(tmp_path / "a.safetensors", "tinyworld")
    torch.save(sd, tmp_path / "a.pt")
    expect_error(PickleRefusedError, tmp_path / "a.pt")
    (tmp_path / "disguised.safetensors").write_bytes((tmp_path / "a.pt").read_bytes())
    expect_error(PickleRefusedError, tmp_path / "disguised.safetensors")
    lora = read_lora(tmp_path / "a.pt", allow_pickle=True)
    reference = read_lora(tmp_path / "a.safetensors")
    for name, module in reference.modules.items():
        assert torch.equal(module.delta_weight(), lora.modules[name].delta_weight())
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not a zip")
    expect_error(CorruptFileError, tmp_path / "broken.ckpt", allow_pickle=True)


def test_non_finite_tensors(tmp_path):
    for value in (float("nan"), float("inf")):
        sd = write_kohya(tmp_path / "a.safetensors", "tinyworld")
        key = sorted(sd)[5]
        sd[key] = sd[key].clone()
        sd[key].view(-1)[3] = value
        save_file(sd, tmp_path / "bad.safetensors")
        assert key in expect_error(NonFiniteError, tmp_path / "bad.safetensors").reason


def test_wrong_family_and_shapes(tmp_path):
    write_kohya(tmp_path / "xl.safetensors", "sdxl")
    err = expect_error(FamilyMismatchError, tmp_path / "xl.safetensors", family="sd15")
    assert "sdxl" in err.reason and "sd15" in err.reason
    err = expect_error(ShapeMismatchError, tmp_path / "xl.safetensors", base_shapes=base_shapes("sd15"))
    shapes = dict(base_shapes("tinyworld"))
    write_kohya(tmp_path / "tw.safetensors", "tinyworld")
    read_lora(tmp_path / "tw.safetensors", family="tinyworld", base_shapes=shapes)
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    shapes[path] = (32, 64)
    assert path in expect_error(ShapeMismatchError, tmp_path / "tw.safetensors", base_shapes=shapes).reason
    del shapes[path]
    assert "not in the base model" in expect_error(ShapeMismatchError, tmp_path / "tw.safetensors", base_shapes=shapes).reason


def test_unknown_and_unsupported(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, tmp_path / "ckpt.safetensors")
    expect_error(UnknownFormatError, tmp_path / "ckpt.safetensors")
    name = kohya_name("unet.down_blocks.0.attentions.0.proj_in", "tinyworld")
    save_file({f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "oft.safetensors")
    assert "OFT" in expect_error(UnknownFormatError, tmp_path / "oft.safetensors").reason
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32, 1, 1), f"{name}.lora_up.weight": torch.zeros(32, 3, 1, 1)},
              tmp_path / "rank.safetensors")
    assert "does not fit" in expect_error(CorruptFileError, tmp_path / "rank.safetensors").reason
    save_file({f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "alpha_only.safetensors")
    expect_error(CorruptFileError, tmp_path / "alpha_only.safetensors")
    bad_meta = {"lora_adapter_metadata": "{not json"}
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1)},
              tmp_path / "meta.safetensors", metadata=bad_meta)
    expect_error(CorruptFileError, tmp_path / "meta.safetensors")


# -- diffusers itself loads what write_lora writes ------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_pipeline(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.tinyworld.models import SCHEDULER_CONFIG
    from studio.tinyworld.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=768, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(tmp_path_factory.mktemp("tok")), unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("dora", [False, True])
def test_diffusers_load_lora_weights_applies_the_same_delta(tmp_path, sd15_pipeline, dora):
    from studio.library import module_shapes, resolve_module

    pipe = sd15_pipeline
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    shapes = module_shapes(components)
    names = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
             "unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.1.attentions.0.proj_in",
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    g = torch.Generator().manual_seed(1)
    modules = {}
    for i, name in enumerate(names):
        out, inp, *k = shapes[name]
        rank = 2 + 2 * (i % 2)
        factors = {"down": torch.randn(rank, inp, *k, generator=g) * 0.1,
                   "up": torch.randn(out, rank, *[1] * len(k), generator=g) * 0.1}
        magnitude = torch.rand(out, *[1] * (len(k) + 1), generator=g) + 0.5 if dora else None
        modules[name] = ModuleLoRA("locon" if k else "lora", factors, [None, 1.0, 3.0][i % 3], magnitude)
    path = write_lora(LoRA(modules, "sd15"), tmp_path / "lora.safetensors", format="diffusers")
    assert read_lora(path, family="sd15", base_shapes=shapes).family == "sd15"

    before = {n: resolve_module(components, n).weight.detach().clone() for n in names}
    pipe.load_lora_weights(str(path), adapter_name=f"test_{dora}")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    try:
        for name in names:
            layer = resolve_module(components, name)
            fused = getattr(layer, "base_layer", layer).weight.detach()
            expected = before[name] + modules[name].delta_weight(before[name])
            torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-5)
    finally:
        pipe.unfuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
