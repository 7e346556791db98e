"""Studio with a LoRA library: prompt tags and the Python API build the same plan and the same images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_fixtures import is_attention, random_lora, tiny_pipeline
from library_fixtures import write_kohya

from studio.api import Studio, StudioInputError
from studio.library.formats import write_lora


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studio")
    torch.set_num_threads(1)
    pipe = tiny_pipeline(tmp)
    pipe.save_pretrained(tmp / "model")
    lib = tmp / "library"
    lib.mkdir()
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    write_lora(random_lora(models, rank=4, seed=3, select=lambda n: n.startswith("unet.") and is_attention(n),
                           strength=1.0), lib / "inky.safetensors")
    write_kohya(lib / "for_sd15.safetensors", "sd15")
    studio = Studio(model=tmp / "model", device="cpu", library=lib)
    return studio, tmp


def _arr(results):
    return np.stack([np.asarray(r.image) for r in results])


def test_prompt_tags_and_api_give_the_same_images(setup):
    studio, _ = setup
    base = _arr(studio.generate("a red star", n=1, seed=1, steps=4))
    tagged = studio.generate("a red star <lora:inky:1>", n=1, seed=1, steps=4)
    api = _arr(studio.generate("a red star", n=1, seed=1, steps=4, loras=[("inky", 1.0)]))
    effect = np.abs(_arr(tagged).astype(int) - base.astype(int)).mean()
    # same plan, same weights; the runtime may pick the folded or the low-rank path per layer (float rounding)
    assert np.abs(_arr(tagged).astype(int) - api.astype(int)).mean() < 0.1 * effect
    assert effect > 2.0
    rec = tagged[0].recipe
    assert rec.prompt == "a red star" and rec.loras[0]["name"] == "inky" and rec.method == "merge"
    assert "<lora:inky:1>" in rec.to_a1111_parameters()


def test_weight_zero_and_plain_runs_give_the_base_image(setup):
    studio, _ = setup
    base = _arr(studio.generate("a blue circle", n=1, seed=2, steps=4))
    zero = _arr(studio.generate("a blue circle <lora:inky:0>", n=1, seed=2, steps=4))
    after = _arr(studio.generate("a blue circle", n=1, seed=2, steps=4))  # the LoRA is switched off again
    assert np.array_equal(base, zero) and np.array_equal(base, after)


def test_switch_and_blockwise_run_through_the_same_call(setup):
    studio, _ = setup
    out = studio.generate("a green square <lora:inky:1:lbw=MIDD:start=2:stop=4>", n=1, seed=0, steps=4)
    assert out[0].recipe.method == "blockwise"
    out = studio.generate("a green square", n=1, seed=0, steps=4, loras=["inky"], method="switch",
                          method_params={"tau": 2})
    assert out[0].recipe.method == "switch"


def test_lora_for_another_base_model_is_refused_with_the_fix(setup):
    studio, _ = setup
    with pytest.raises(StudioInputError, match=r"for_sd15\.safetensors.*sd15.*tinyworld"):
        studio.generate("a red star <lora:for_sd15:1>", n=1, steps=2)


def test_unknown_lora_names_the_library(setup):
    studio, tmp = setup
    with pytest.raises(StudioInputError, match="library"):
        studio.generate("a red star <lora:nosuch:1>", n=1, steps=2)
