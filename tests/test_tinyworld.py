"""TinyWorld: catalogue, renderer, tokenizer, committed judge and pipeline."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from studio.tinyworld import catalog as cat
from studio.tinyworld import train_lora
from studio.tinyworld.render import render

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


# ---------------------------------------------------------------- catalogue
def test_catalogue_sizes_match_the_design():
    assert len(cat.SHAPES) >= 6 and len(cat.COLORS) >= 8 and len(cat.BACKGROUNDS) >= 4
    need = {"character": 6, "clothing": 4, "style": 6, "background": 6, "object": 4}
    for category, n in need.items():
        assert len(cat.CONCEPTS_BY_CATEGORY[category]) >= n, category


def test_triggers_are_unique_and_never_in_descriptions():
    triggers = [c.trigger for c in cat.CONCEPTS]
    assert len(set(triggers)) == len(triggers)
    base_words = set(cat.SHAPES) | set(cat.COLORS) | set(cat.BACKGROUNDS)
    for c in cat.CONCEPTS:
        assert c.trigger not in base_words
        assert c.trigger not in c.description.lower()
        for other in cat.CONCEPTS:
            assert other.trigger not in c.description.lower()


def test_base_captions_name_only_base_vocabulary():
    rng = random.Random(0)
    triggers = {c.trigger for c in cat.CONCEPTS}
    for _ in range(300):
        comp = cat.sample_base(rng)
        text = cat.caption(comp, rng)
        assert comp.subject in text and comp.color in text and comp.background in text
        assert not (set(text.replace(",", " ").split()) & triggers)
        assert comp.concepts() == []


def test_concept_captions_carry_trigger_words():
    rng = random.Random(1)
    for _ in range(200):
        comp = cat.sample_any(rng, 0.7)
        text = cat.caption(comp, rng)
        for name in comp.concepts():
            assert cat.CONCEPTS_BY_NAME[name].trigger in text


# ---------------------------------------------------------------- renderer
def test_render_is_deterministic_and_sized():
    comp = cat.Composition(subject="zorbo", color="blue", background="starfield", clothing="hat", style="stripes",
                           object="ball")
    a, b = render(comp, seed=3), render(comp, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(comp, seed=4))


@pytest.mark.parametrize("concept", [c.name for c in cat.CONCEPTS])
def test_every_concept_changes_the_picture(concept):
    base = cat.Composition(subject="circle", color="red", background="gray", position="left")
    with_concept = train_lora.with_concept(cat.Composition(**base.to_dict()), concept)
    diff = np.abs(render(base, seed=0).astype(int) - render(with_concept, seed=0).astype(int)).mean()
    assert diff > 1.0, f"{concept} barely changes the render ({diff:.2f})"


def test_every_composition_renders():
    rng = random.Random(5)
    for _ in range(100):
        img = render(cat.sample_any(rng, 0.8), rng=rng)
        assert img.std() > 5


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_ids_equal_open_clip(tmp_path):
    import open_clip

    from studio.tinyworld.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok")
    rng = random.Random(2)
    captions = [cat.caption(cat.sample_any(rng, 0.5), rng) for _ in range(40)]
    captions += ["A Tiny PASTAVI purple star, against a gray backdrop!", "naïve café, 3 stars & 2 moons"]
    ref = open_clip.tokenize(captions)  # context 77, zero padded
    for text, r in zip(captions, ref):
        ids = tok(text, truncation=True, max_length=77).input_ids
        assert ids == [i for i in r.tolist() if i != 0]


def test_committed_tokenizer_equals_built_one():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(ASSETS / "tinyworld" / "tokenizer"))
    assert tok("a red zorbix on a black background").input_ids == [49406, 320, 736, 17605, 717, 343, 525, 320,
                                                                   1449, 5994, 49407]
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407


# ---------------------------------------------------------------- judge
def test_judge_accuracy_table_meets_target():
    table = json.loads((ASSETS / "judge" / "accuracy.json").read_text())
    assert table["heldout_renders"] >= 2000
    assert set(table["accuracy"]) == set(cat.LABEL_HEADS)
    for head, acc in table["accuracy"].items():
        assert acc >= 0.98, (head, acc)
    # generated pictures pass through the VAE: the judge must read renders after that round trip too
    assert set(table["accuracy_vae_roundtrip"]) == set(cat.LABEL_HEADS)
    for head, acc in table["accuracy_vae_roundtrip"].items():
        assert acc >= 0.93, (head, acc)


def test_judge_reads_fresh_renders():
    from studio.tinyworld.judge import JudgeModel

    rng = random.Random(777)
    comps = [cat.sample_any(rng, 0.5) for _ in range(300)]
    preds = JudgeModel().predict(np.stack([render(c, rng=rng) for c in comps]))
    for head in cat.LABEL_HEADS:
        truth = [cat.LABEL_HEADS[head][cat.labels_of(c)[head]] for c in comps]
        acc = np.mean([p[head] == t for p, t in zip(preds, truth)])
        assert acc >= 0.95, (head, acc)


# ---------------------------------------------------------------- the pipeline
def test_tinyworld_is_a_genuine_sd15_structured_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ASSETS / "tinyworld"), safety_checker=None,
                                                   requires_safety_checker=False)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert list(pipe.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(pipe.unet.config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert pipe.unet.config.layers_per_block == 2
    names = {n for n, _ in pipe.unet.named_modules()}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v" in names


def test_assets_stay_small():
    """All of `assets/` (model 33 MB, 26 headline LoRAs resized to ~25 MB, judge 1 MB) stays under `ASSETS_LIMIT_MB`;
    caches of the shipped library live in `runs/cache/`, never under `assets/` (`cache_dir`)."""
    from studio.library.catalog import cache_dir
    from studio.tinyworld.report import ASSETS_LIMIT_MB

    assert ASSETS_LIMIT_MB == 60   # issue 2: all of assets/ <= 60 MB
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= ASSETS_LIMIT_MB * 1000 * 1000, total
    assert not cache_dir(ASSETS / "loras").is_relative_to(ASSETS)


@pytest.fixture(scope="module")
def studio():
    from studio.api import Studio

    return Studio(device="cpu")


def test_generate_is_deterministic_and_carries_its_recipe(studio, tmp_path):
    from studio.recipe import read_recipe

    out = studio.generate("a red star on a black background", n=2, seed=5, steps=10, out=tmp_path)
    again = studio.generate("a red star on a black background", n=1, seed=6, steps=10)
    assert [r.image.size for r in out] == [(64, 64), (64, 64)]
    # image i uses seed + i: reproducible alone, up to float rounding between batch sizes
    gap = np.abs(np.asarray(out[1].image).astype(int) - np.asarray(again[0].image).astype(int))
    assert gap.mean() < 0.5 and gap.max() <= 8
    same = studio.generate("a red star on a black background", n=2, seed=5, steps=10)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(out, same))
    assert not np.array_equal(np.asarray(out[0].image), np.asarray(out[1].image))
    rec = read_recipe(out[0].path)
    assert rec.prompt == "a red star on a black background" and rec.seed == 5 and rec.steps == 10
    from PIL import Image

    assert "Steps: 10" in Image.open(out[0].path).text["parameters"]


def test_generated_images_follow_the_prompt(studio):
    from studio.tinyworld.judge import JudgeModel

    prompts = ["a large yellow circle on a black background", "a large blue square on a white background"]
    res = studio.generate_many(prompts * 4, list(range(8)), steps=20, progress=False)
    preds = JudgeModel().predict([r.image for r in res])
    ok = [p["color"] == pr.split()[2] for p, pr in zip(preds, prompts * 4)]
    assert np.mean(ok) >= 0.75


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="x" * 5000), "characters"),
    (dict(prompt="a red star", steps=100000), "steps=100000"),
    (dict(prompt="a red star", steps=0), "steps=0"),
    (dict(prompt="a red star", n=10**6), "n=1000000"),
    (dict(prompt="a red star", cfg=float("nan")), "cfg=nan"),
])
def test_absurd_requests_get_clear_errors(kwargs, words):
    from studio.api import StudioInputError, validate_request

    args = dict(n=1, steps=25, cfg=7.0) | kwargs
    with pytest.raises(StudioInputError, match=words):
        validate_request(args.pop("prompt"), **args)


def test_cli_generate_writes_pngs(tmp_path, capsys):
    from studio.cli import main

    assert main(["generate", "a green cross on a gray background", "--n", "1", "--steps", "5", "--out",
                 str(tmp_path), "--device", "cpu"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1
    assert str(tmp_path.resolve()) in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from studio.cli import main

    assert main(["generate", "a red star", "--steps", "9999", "--out", str(tmp_path)]) == 2
    assert "steps=9999" in capsys.readouterr().err
