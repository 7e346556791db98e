"""The launched app (`app.py`) driven through `gradio_client`: every named API endpoint, and concurrent generate
jobs through the queue. TinyWorld on CPU, a small synthetic library, 4 denoising steps."""
from __future__ import annotations

import json
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

import app as appmod  # noqa: E402
from fusion.schedules import SCHEDULES  # noqa: E402
from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library  # noqa: E402
from studio.recipe import read_recipe  # noqa: E402

PROMPT = "a round alien creature wearing a hat"
STEPS = 4
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows) -> dict:
    return {"headers": appmod.LORA_HEADERS, "data": rows}


def choices(update) -> list[str]:
    return [c[0] if isinstance(c, (list, tuple)) else c for c in update["choices"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("client")
    write_synthetic_library(tmp / "lib", ["zorbo", "hat", "stripes"], ranks=(4,), seeds=(0,), shapes=SMALL_TARGETS,
                            name_style="concept")
    write_synthetic_library(tmp / "staging", ["crown"], ranks=(4,), seeds=(3,), shapes=SMALL_TARGETS,
                            name_style="concept")  # uploaded later
    studio_app = appmod.StudioApp(library=tmp / "lib", out=tmp / "out", device="cpu")
    studio_app.warm_up()
    demo = studio_app.launch(port=free_port(), quiet=True, prevent_thread_lock=True)
    client = Client(demo.local_url, verbose=False, download_files=str(tmp / "downloads"))
    yield studio_app, demo, client, tmp
    client.close()
    demo.close()
    studio_app.close()


def test_served_on_localhost_with_every_endpoint(served):
    studio_app, demo, client, _ = served
    assert demo.server_name == "127.0.0.1" and demo.local_url.startswith("http://127.0.0.1:")
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {f"/{name}" for name in appmod.ENDPOINTS}


def test_methods_library_and_rescan(served):
    _, _, client, _ = served
    assert choices(client.predict(api_name="/methods")) == ["auto", *SCHEDULES]
    for endpoint in ("/library", "/rescan"):
        rows, add_names, inspect_names = client.predict(api_name=endpoint)
        assert rows["headers"] == appmod.LIBRARY_HEADERS
        names = sorted(r[0] for r in rows["data"])
        assert names == ["hat_r4_s0", "stripes_r4_s0", "zorbo_r4_s0"]
        assert all(r[2] == "tinyworld" and r[6] == "ok" for r in rows["data"])
        assert sorted(choices(add_names)) == names == sorted(choices(inspect_names))


def test_search_and_inspect(served):
    _, _, client, _ = served
    hits = client.predict("a hat", 3, api_name="/search")
    assert hits["data"][0][0] == "hat_r4_s0" and hits["data"][0][2] == "hatzel"
    report, triggers, description, preview = client.predict("hat_r4_s0", api_name="/inspect")
    assert "hat_r4_s0.safetensors" in report and "kohya" in report.lower()
    assert triggers.startswith("hatzel") and description and preview is None  # no preview image in this library
    with pytest.raises(Exception, match="not in the list of choices"):  # the dropdown admits library LoRAs only
        client.predict("../../etc/passwd", api_name="/inspect")


def test_retrieve_add_and_remove_rows(served):
    _, _, client, _ = served
    rows, why, prompt = client.predict(PROMPT, 2, api_name="/retrieve")
    assert sorted(r[0] for r in rows["data"]) == ["hat_r4_s0", "zorbo_r4_s0"]
    assert "zorbix" in prompt and "hatzel" in prompt and "hat_r4_s0" in why
    rows2, prompt2 = client.predict(prompt, rows, "stripes_r4_s0", api_name="/add_lora")
    assert [r[0] for r in rows2["data"]][-1] == "stripes_r4_s0" and "strypo" in prompt2
    rows3 = client.predict(rows2, "hat_r4_s0", api_name="/remove_lora")
    assert sorted(r[0] for r in rows3["data"]) == ["stripes_r4_s0", "zorbo_r4_s0"]


def test_a_fresh_client_can_add_and_inspect_without_the_page_load(served):
    """An API client fires no page-load event: the LoRA dropdowns must already admit the library's names for a
    session that never called /library or /rescan (they used to start empty, so this depended on test order)."""
    _, demo, _, tmp = served
    fresh = Client(demo.local_url, verbose=False, download_files=str(tmp / "downloads_fresh"))
    try:
        rows, prompt = fresh.predict("a cat", table([]), "stripes_r4_s0", api_name="/add_lora")
        assert [r[0] for r in rows["data"]] == ["stripes_r4_s0"] and "strypo" in prompt
        report, triggers, _, _ = fresh.predict("hat_r4_s0", api_name="/inspect")
        assert "hat_r4_s0.safetensors" in report and triggers.startswith("hatzel")
        with pytest.raises(Exception, match="not in the list of choices"):  # still library LoRAs only
            fresh.predict("a cat", table([]), "nosuch", api_name="/add_lora")
    finally:
        fresh.close()


def test_generate_and_select_recipe(served):
    _, _, client, _ = served
    rows = table([["zorbo_r4_s0", 0.8, "", None, None], ["hat_r4_s0", 1.0, "", None, None]])
    gallery, recipes, heat, status = client.predict(PROMPT, rows, "switch", '{"tau": 2}', 7, 2, STEPS, 7.0, "",
                                                    True, True, api_name="/generate")
    assert len(gallery) == 2 and [r["seed"] for r in recipes] == [7, 8]
    for item, seed in zip(gallery, (7, 8)):
        rec = read_recipe(item["image"])  # the PNG that came back carries its recipe
        assert rec.seed == seed and rec.steps == STEPS and rec.method == "switch"
        assert [(l["name"], l["weight"]) for l in rec.loras] == [("zorbo_r4_s0", 0.8), ("hat_r4_s0", 1.0)]
        assert item["caption"] == f"seed {seed}"
    with Image.open(heat) as im:
        assert im.width > 100 and im.height > 50  # the weight heatmap
    assert "2 image(s)" in status and "switch" in status
    assert client.predict(recipes, 1, api_name="/select_recipe") == recipes[1]
    assert client.predict(recipes, 5, api_name="/select_recipe") is None
    # a click on the gallery: Gradio injects the event data (the hint must be the plain class for that)
    assert appmod.StudioApp.select_recipe(recipes, None, gr.SelectData(None, {"index": 1, "value": None})) == \
        recipes[1]
    import typing

    hint = typing.get_type_hints(appmod.StudioApp.select_recipe)["evt"]
    assert isinstance(hint, type) and issubclass(hint, gr.EventData)
    with pytest.raises(Exception, match="not JSON"):
        client.predict(PROMPT, rows, "switch", "{tau", 0, 1, STEPS, 7.0, "", True, False, api_name="/generate")


def test_concurrent_generate_jobs_through_the_queue(served):
    """Four clients' jobs at once: the queue runs them one by one on the Studio's thread; none is lost."""
    _, _, client, _ = served
    loras = [[], [["zorbo_r4_s0", 1.0, "", None, None]], [["hat_r4_s0", 0.6, "", None, None]],
             [["stripes_r4_s0", 1.0, "", None, None], ["zorbo_r4_s0", 0.5, "", None, None]]]
    seeds = [100, 200, 300, 400]

    def run(i):
        job = client.submit(f"a red star, job {i}", table(loras[i]), "auto", "", seeds[i], 2, STEPS, 7.0, "", False,
                            False, api_name="/generate")
        return job.result(timeout=TIMEOUT)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert len(results) == 4
    all_seeds, all_files = [], set()
    for i, (gallery, recipes, heat, status) in enumerate(results):
        assert len(gallery) == 2 and len(recipes) == 2 and heat is None
        assert [r["seed"] for r in recipes] == [seeds[i], seeds[i] + 1]
        assert all(r["prompt"] == f"a red star, job {i}" for r in recipes)
        assert [l["name"] for l in recipes[0]["loras"]] == [row[0] for row in loras[i]]
        for item, recipe in zip(gallery, recipes):
            rec = read_recipe(item["image"])
            assert (rec.seed, rec.prompt) == (recipe["seed"], recipe["prompt"])
            all_files.add(item["image"])
        all_seeds += [r["seed"] for r in recipes]
    assert len(set(all_seeds)) == 8 and len(all_files) == 8  # eight distinct images, none lost or mixed up


def test_upload_through_the_server(served):
    studio_app, _, client, tmp = served
    status, rows, add_names, inspect_names, report = client.predict(
        handle_file(str(tmp / "staging" / "crown_r4_s3.safetensors")), api_name="/upload")
    assert "added **crown_r4_s3**" in status and "crown_r4_s3.safetensors" in report
    assert "crown_r4_s3" in choices(add_names) and len(rows["data"]) == 4
    assert (studio_app.library / "uploads" / "crown_r4_s3.safetensors").is_file()
    with pytest.raises(Exception, match="same tensors"):  # the same file again: a duplicate, not kept
        client.predict(handle_file(str(tmp / "staging" / "crown_r4_s3.safetensors")), api_name="/upload")
    assert sorted(p.name for p in (studio_app.library / "uploads").iterdir()) == ["crown_r4_s3.safetensors"]


def test_style_map_endpoints(served):
    _, _, client, _ = served
    image, status, rows = client.predict(api_name="/style_map_initial")
    assert image is None or Path(image).is_file()
    image, status, rows = client.predict(True, 2, False, api_name="/style_map")
    with Image.open(image) as im:
        assert im.width > 50
    assert "style cluster(s)" in status and len(rows["data"]) == 2
    assert sum(r[1] for r in rows["data"]) == len(set(sum((r[2].split(", ") for r in rows["data"]), [])))
    image, status, rows2 = client.predict(api_name="/style_map_initial")  # now the last map
    assert Path(image).is_file() and rows2["data"] == rows["data"] and "last style map" in status


def test_batch_endpoint(served):
    _, _, client, tmp = served
    jobs = tmp / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "a red star", "seeds": [0, 1], "steps": 2}) + "\n" +
                    json.dumps({"id": "b", "prompt": "a blue circle", "loras": ["hat_r4_s0"], "seed": 4,
                                "steps": 2}) + "\n")
    archive, status, gallery = client.predict(handle_file(str(jobs)), 1, api_name="/batch")
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["a-seed0.png", "a-seed1.png", "b-seed4.png", "manifest.jsonl"]
        manifest = [json.loads(line) for line in z.read("manifest.jsonl").decode().splitlines()]
    assert sorted((m["job"], m["seed"]) for m in manifest) == [("a", 0), ("a", 1), ("b", 4)]
    assert "3 generated" in status and len(gallery) == 3
    _, status, _ = client.predict(handle_file(str(jobs)), 1, api_name="/batch")  # resumed
    assert "0 generated, 3 already done" in status
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "a star", "loras": ["nosuch"]}) + "\n")
    with pytest.raises(Exception, match="nosuch"):
        client.predict(handle_file(str(bad)), 1, api_name="/batch")
