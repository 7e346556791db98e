"""Recipe <-> A1111 `parameters` text and PNG text chunks."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from studio.recipe import Recipe, lora_hash, model_hash, read_recipe, save_png


def full_recipe() -> Recipe:
    return Recipe(
        prompt="a red cube on a table",
        negative_prompt="blurry, low quality",
        seed=1,
        steps=25,
        cfg=7.0,
        sampler="dpm++",
        width=64,
        height=64,
        model="tinyworld",
        model_hash="0123456789",
        loras=[
            {"name": "cube_style", "weight": 0.8, "hash": "abcdef012345"},
            {"name": "red", "weight": 1.0, "hash": "0123456789ab"},
        ],
    )


def image() -> Image.Image:
    return Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))


def test_a1111_text_exact():
    assert full_recipe().to_a1111_parameters() == (
        "a red cube on a table <lora:cube_style:0.8> <lora:red:1>\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 0123456789, "
        'Model: tinyworld, Lora hashes: "cube_style: abcdef012345, red: 0123456789ab"'
    )


def test_a1111_text_minimal():
    recipe = Recipe(prompt="a cube", seed=42, steps=2, cfg=7.5, sampler="ddim", width=64, height=32, model="my, model")
    assert recipe.to_a1111_parameters() == (
        'a cube\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x32, Model: "my, model"'
    )


def test_png_round_trip(tmp_path):
    recipe = full_recipe()
    recipe.method = "lora"
    recipe.method_params = {"rank": 4, "alpha": 4.0}
    recipe.extras = {"note": "café ☕"}
    path = save_png(image(), tmp_path / "out.png", recipe)

    assert read_recipe(path) == recipe
    with Image.open(path) as saved:
        assert saved.text["parameters"] == recipe.to_a1111_parameters()
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(image()))
    raw = path.read_bytes()
    assert b"tEXtparameters\x00" in raw and b"tEXtstudio\x00" in raw


def test_a1111_text_fallback(tmp_path):
    recipe = full_recipe()
    info = PngInfo()
    info.add_text("parameters", recipe.to_a1111_parameters())
    image().save(tmp_path / "a1111.png", pnginfo=info)
    assert read_recipe(tmp_path / "a1111.png") == recipe


def test_parse_a1111_infotext():
    text = (
        "masterpiece, cube,\nsecond line <lora:style:0.65> <lora:other:1:0.5>\n"
        "Negative prompt: ugly\nbad hands\n"
        "Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, Seed: 123456789, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "style: 1a2b3c4d5e6f", Version: v1.10.1'
    )
    recipe = Recipe.from_a1111_parameters(text)
    assert recipe.prompt == "masterpiece, cube,\nsecond line"
    assert recipe.negative_prompt == "ugly\nbad hands"
    assert (recipe.steps, recipe.sampler, recipe.cfg, recipe.seed) == (30, "Euler a", 6.5, 123456789)
    assert (recipe.width, recipe.height) == (512, 768)
    assert (recipe.model, recipe.model_hash) == ("v1-5-pruned-emaonly", "6ce0161689")
    assert recipe.loras == [
        {"name": "style", "weight": 0.65, "hash": "1a2b3c4d5e6f"},
        {"name": "other", "weight": 1.0, "hash": ""},
    ]
    assert recipe.extras == {"Schedule type": "Karras", "Version": "v1.10.1"}


def test_prompt_only_text():
    recipe = Recipe.from_a1111_parameters("just a prompt")
    assert recipe.prompt == "just a prompt" and recipe.extras == {}


def test_png_without_parameters(tmp_path):
    image().save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no generation parameters"):
        read_recipe(tmp_path / "plain.png")


def test_hashes(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"ss_output_name": "a"})
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "b"})
    full = hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    assert model_hash(tmp_path / "a.safetensors") == full[:10]
    assert model_hash(tmp_path / "a.safetensors") != model_hash(tmp_path / "b.safetensors")
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors")  # header excluded
    assert len(lora_hash(tmp_path / "a.safetensors")) == 12
    assert len(model_hash(tmp_path)) == 10  # a folder: its safetensors files
