"""The Gradio app (`app.py`): the Blocks build without launching; its handlers, called directly, do the work."""
from __future__ import annotations

import gradio as gr
import pytest
import torch
from PIL import Image

import app as appmod
from fusion.schedules import SCHEDULES
from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library
from studio.recipe import read_recipe

PROMPT = "a round alien creature wearing a hat"


class Progress:
    """Records what a handler reports to `gr.Progress`."""

    def __init__(self):
        self.calls = []

    def __call__(self, value, desc=None, unit=None, **kw):
        self.calls.append(value)


@pytest.fixture(scope="module")
def studio_app(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("app")
    write_synthetic_library(tmp / "lib", ["zorbo", "hat", "stripes"], ranks=(4,), seeds=(0, 1), shapes=SMALL_TARGETS,
                            name_style="concept")
    a = appmod.StudioApp(library=tmp / "lib", out=tmp / "out", device="cpu")
    a.warm_up()
    yield a
    a.close()


@pytest.fixture(scope="module")
def empty_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("empty")
    a = appmod.StudioApp(library=tmp / "lib", out=tmp / "out", device="cpu")
    yield a
    a.close()


def test_blocks_build_with_every_endpoint_and_every_fusion_method(studio_app):
    demo = studio_app.build()
    assert isinstance(demo, gr.Blocks)
    names = {f.api_name for f in demo.fns.values()}
    assert set(appmod.ENDPOINTS) <= names
    assert appmod.methods() == list(SCHEDULES)
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Fusion method"]
    assert [c[0] for c in dropdowns[0].choices] == ["auto", *SCHEDULES]
    table = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataframe) and b.elem_id == "loras")
    assert table.interactive and list(table.headers) == appmod.LORA_HEADERS


def test_retrieve_fills_the_lora_table_and_inserts_trigger_words(studio_app):
    rows, why, prompt = studio_app.retrieve(PROMPT, 2)
    assert len(rows) == 2 and {r[0].split("_")[0] for r in rows} == {"zorbo", "hat"}
    assert all(r[1:] == [1.0, "", None, None] for r in rows)  # weight, block preset, start, stop: editable
    assert all(r[0] in why for r in rows)
    assert "zorbix" in prompt and "hatzel" in prompt
    with pytest.raises(gr.Error, match="prompt is empty"):
        studio_app.retrieve("  ", 2)


def test_generate_returns_images_recipes_and_a_weight_heatmap(studio_app):
    rows, _, prompt = studio_app.retrieve(PROMPT, 2)
    rows[0][1], rows[0][2], rows[0][3], rows[0][4] = 0.7, "MIDD", 2, 4  # edit the table
    progress = Progress()
    gallery, recipes, heat, status = studio_app.generate(prompt, rows, "auto", "", 5, 2, 4, 7.0, "", True, True,
                                                         progress)
    assert len(gallery) == 2 and [r["seed"] for r in recipes] == [5, 6]
    rec = read_recipe(gallery[0][0])
    assert rec.method == "blockwise" and rec.seed == 5 and rec.steps == 4  # start/stop/preset: blockwise
    assert [(l["name"], l["weight"]) for l in rec.loras] == [(rows[0][0], 0.7), (rows[1][0], 1.0)]
    assert rec.method_params["loras"][0]["lbw"] == "MIDD"
    assert isinstance(heat, Image.Image) and heat.width > 100 and heat.height > 50
    assert progress.calls[-1] == (4, 4)  # one report per denoising step
    assert "2 image(s)" in status and "blockwise" in status


@pytest.mark.parametrize("method", list(SCHEDULES))
def test_every_fusion_method_runs_from_the_selector(studio_app, method):
    rows = [["zorbo_r4_s0", 1.0, "", None, None], ["hat_r4_s0", 0.8, "", None, None]]
    gallery, recipes, heat, status = studio_app.generate(PROMPT, rows, method, "", 0, 1, 4, 7.0, "", False, True,
                                                         Progress())
    assert len(gallery) == 1 and recipes[0]["method"] == method
    assert heat is not None  # the applied weights per step, whatever the method
    trace = studio_app.studio.last_weight_trace
    assert trace["names"] == ["zorbo_r4_s0", "hat_r4_s0"] and trace["weights"].shape[:2] == (4, 2)


def test_an_empty_table_auto_picks_and_bad_input_is_a_clear_error(studio_app):
    gallery, recipes, heat, status = studio_app.generate(PROMPT, [], "auto", "", 0, 1, 4, 7.0, "", True, False,
                                                         Progress())
    assert {l["name"].split("_")[0] for l in recipes[0]["loras"]} >= {"zorbo"} and "auto-pick" in status
    with pytest.raises(gr.Error, match="not JSON"):
        studio_app.generate(PROMPT, [], "switch", "{tau: 5", 0, 1, 4, 7.0, "", True, False, Progress())
    with pytest.raises(gr.Error, match="no LoRA 'nosuch'"):
        studio_app.generate(PROMPT, [["nosuch", 1, "", None, None]], "auto", "", 0, 1, 4, 7.0, "", False, False,
                            Progress())
    with pytest.raises(gr.Error, match="steps="):
        studio_app.generate(PROMPT, [], "auto", "", 0, 1, 1000, 7.0, "", False, False, Progress())


def test_library_search_and_inspect(studio_app):
    rows, names, which = studio_app.library_table()
    assert len(rows) == 6 and sorted(names["choices"]) == sorted(r[0] for r in rows)
    hat = next(r for r in rows if r[0] == "hat_r4_s0")
    assert hat[2] == "tinyworld" and hat[5].startswith("hatzel") and hat[6] == "ok"
    hits = studio_app.search("a hat", 3)
    assert hits and hits[0][0].startswith("hat_") and hits[0][3] == "hatzel" and hits[0][2] == "hatzel"   # model
    report, triggers, description, preview = studio_app.inspect("hat_r4_s0")
    assert "hat_r4_s0.safetensors" in report and "kohya" in report.lower()
    assert triggers.startswith("hatzel")
    with pytest.raises(gr.Error, match="no LoRA"):
        studio_app.inspect("nosuch")


def test_style_map_tab_clusters_the_library(studio_app):
    image, status, rows = studio_app.style_map(True, 0, False)
    assert isinstance(image, Image.Image) and "6 tinyworld LoRA(s)" in status
    assert sum(r[1] for r in rows) == 6 and len(rows) >= 2
    assert studio_app.style_map_png.is_file()
    again, status, rows2 = studio_app.style_map(False)  # the page load shows the last map
    assert again.size == image.size and rows2 == rows
    _, _, rows3 = studio_app.style_map(True, 2, False)
    assert len(rows3) == 2


def test_an_empty_library_is_handled(empty_app):
    rows, names, _ = empty_app.library_table()
    assert rows == [] and names["choices"] == []
    rows, why, prompt = empty_app.retrieve(PROMPT, 3)
    assert rows == [] and "no LoRA" in why and prompt == PROMPT
    assert empty_app.search("a hat", 5) == []
    gallery, recipes, heat, status = empty_app.generate(PROMPT, [], "auto", "", 0, 1, 4, 7.0, "", True, True,
                                                        Progress())
    assert len(gallery) == 1 and recipes[0]["loras"] == [] and heat is None
    image, status, rows = empty_app.style_map(False)
    assert image is None and "empty" in status and rows == []
    image, status, rows = empty_app.style_map(True, 0, False)
    assert image is None and "no LoRA to cluster" in status
    assert isinstance(empty_app.build(), gr.Blocks)


def test_add_remove_rows_and_the_batch_tab(studio_app):
    rows, prompt = studio_app.add_lora("a blue circle", [], "stripes_r4_s0")
    assert rows == [["stripes_r4_s0", 1.0, "", None, None]] and "strypo" in prompt  # its trigger word
    assert studio_app.add_lora(prompt, rows, "stripes_r4_s0") == (rows, prompt)  # not twice
    assert studio_app.remove_lora(rows, "stripes_r4_s0") == []

    jobs = studio_app.out / "jobs.jsonl"  # handlers read files only from the upload, library and output folders
    jobs.write_text('{"id": "a", "prompt": "a red star", "seeds": [0, 1], "steps": 2}\n'
                    '{"id": "b", "prompt": "a blue circle", "loras": ["hat_r4_s0"], "seed": 4, "steps": 2}\n')
    progress = Progress()
    archive, status, gallery = studio_app.batch(str(jobs), 1, progress)
    import zipfile

    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["a-seed0.png", "a-seed1.png", "b-seed4.png", "manifest.jsonl"]
    assert "3 generated" in status and len(gallery) == 3 and progress.calls[-1] == (3, 3)
    _, status, _ = studio_app.batch(str(jobs), 1, Progress())  # the same file again: resumed, nothing new
    assert "0 generated, 3 already done" in status
