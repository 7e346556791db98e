"""Batch jobs (`studio batch`, `Studio.generate_batch`): PNGs with recipes, a manifest, resume, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library
from studio.api import Studio, StudioInputError
from studio.batch import MANIFEST, BatchJobError, read_manifest
from studio.cli import main
from studio.recipe import read_recipe

AUTO_PROMPT = "a round alien creature wearing a hat"
JOBS = [
    {"id": "plain", "prompt": "a red star on a black background", "seeds": [0, 1], "steps": 4},
    {"id": "auto", "prompt": AUTO_PROMPT, "loras": "auto", "seed": 3, "n": 1, "steps": 4},
    {"id": "switch", "prompt": "a blue circle", "loras": [["stripes_r4_s0", 0.8], "hat_r4_s0"], "method": "switch",
     "method_params": {"tau": 2}, "seeds": [5], "steps": 4},
]
FILES = ["plain-seed0.png", "plain-seed1.png", "auto-seed3.png", "switch-seed5.png"]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    torch.set_num_threads(1)
    lib = tmp_path_factory.mktemp("batch") / "lib"
    write_synthetic_library(lib, ["zorbo", "hat", "stripes"], ranks=(4,), seeds=(0,), shapes=SMALL_TARGETS,
                            name_style="concept")
    return Studio(device="cpu", library=lib)


def _write_jsonl(path, jobs):
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    return path


def _same(a, b) -> bool:
    """The same image: equal, up to the fusion runtime's float rounding (it folds a LoRA into the weight or runs it
    low-rank per layer, by a cost model that learns the activations' size on the first call): at most a level or
    two on a few pixels."""
    d = np.abs(_pixels(a).astype(int) - _pixels(b).astype(int))
    return d.max() <= 2 and d.mean() < 0.05


def _pixels(path_or_image):
    if isinstance(path_or_image, Image.Image):
        return np.asarray(path_or_image.convert("RGB"))
    with Image.open(path_or_image) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def first_run(studio, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    jobfile = _write_jsonl(tmp / "jobs.jsonl", JOBS)
    out = tmp / "out"
    seen = []
    report = studio.generate_batch(jobfile, out=out, progress=False, on_progress=lambda d, t: seen.append((d, t)))
    return report, out, jobfile, seen


def test_a_job_file_gives_pngs_with_recipes_and_a_manifest(first_run):
    report, out, _, seen = first_run
    assert (report.jobs, report.images, report.generated, report.skipped) == (3, 4, 4, 0)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(FILES)
    assert seen[-1] == (4, 4)

    rows = read_manifest(out)
    assert sorted(r["file"] for r in rows) == sorted(FILES) and len({r["key"] for r in rows}) == 4
    by_file = {r["file"]: r for r in rows}
    assert by_file["plain-seed1.png"]["job"] == "plain" and by_file["plain-seed1.png"]["seed"] == 1

    plain = read_recipe(out / "plain-seed0.png")
    assert (plain.prompt, plain.seed, plain.steps, plain.loras, plain.method) == \
        ("a red star on a black background", 0, 4, [], "")
    auto = read_recipe(out / "auto-seed3.png")
    assert {l["name"] for l in auto.loras} == {"zorbo_r4_s0", "hat_r4_s0"}  # picked by retrieval
    assert "zorbix" in auto.prompt and "hatzel" in auto.prompt  # their trigger words were inserted
    switch = read_recipe(out / "switch-seed5.png")
    assert switch.method == "switch" and switch.method_params["params"] == {"tau": 2}
    assert [(l["name"], l["weight"]) for l in switch.loras] == [("stripes_r4_s0", 0.8), ("hat_r4_s0", 1.0)]
    assert by_file["switch-seed5.png"]["recipe"] == switch.to_dict()  # the manifest line carries the recipe


def test_running_again_resumes_and_generates_nothing_new(studio, first_run):
    _, out, jobfile, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    report = studio.generate_batch(jobfile, out=out, progress=False)
    assert (report.generated, report.skipped) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert len(read_manifest(out)) == 4


def test_an_interrupted_run_finishes_only_what_is_missing(studio, first_run, tmp_path):
    _, out, jobfile, _ = first_run
    part = tmp_path / "part"
    part.mkdir()
    # a run that stopped after two images, the second one torn mid-write of its manifest line
    lines = (out / MANIFEST).read_text().splitlines()
    done = [json.loads(l) for l in lines[:2]]
    for r in done:
        (part / r["file"]).write_bytes((out / r["file"]).read_bytes())
    (part / MANIFEST).write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])
    report = studio.generate_batch(jobfile, out=part, progress=False)
    assert (report.generated, report.skipped) == (2, 2)
    assert sorted(r["file"] for r in read_manifest(part)) == sorted(FILES)
    for name in FILES:  # the same images as an uninterrupted run
        assert _same(part / name, out / name)


def test_a_batch_image_equals_generate_with_the_same_seed(studio, first_run):
    _, out, _, _ = first_run
    auto = studio.generate(AUTO_PROMPT, n=1, seed=3, steps=4, loras="auto")[0]
    assert _same(out / "auto-seed3.png", auto.image)
    assert auto.recipe.to_dict() == read_recipe(out / "auto-seed3.png").to_dict()
    switch = studio.generate("a blue circle", n=1, seed=5, steps=4, loras=[("stripes_r4_s0", 0.8), "hat_r4_s0"],
                             method="switch", method_params={"tau": 2})[0]
    assert _same(out / "switch-seed5.png", switch.image)
    plain = studio.generate("a red star on a black background", n=1, seed=1, steps=4)[0]
    assert np.array_equal(_pixels(out / "plain-seed1.png"), _pixels(plain.image))  # no LoRA: bit for bit
    # the tolerance is far below what the LoRAs change
    no_lora = studio.generate(auto.recipe.prompt, n=1, seed=3, steps=4)[0]
    assert np.abs(_pixels(no_lora.image).astype(int) - _pixels(auto.image).astype(int)).mean() > 1.0


@pytest.mark.parametrize("bad, message", [
    ({"id": "huge", "prompt": "a red star", "steps": 100000}, r"job 3 \('huge'\).*steps=100000"),
    ({"id": "ghost", "prompt": "a red star", "loras": ["no_such_lora"], "steps": 4},
     r"job 3 \('ghost'\).*no LoRA 'no_such_lora'"),
    ({"id": "meth", "prompt": "a red star", "loras": ["hat_r4_s0"], "method": "blend", "steps": 4},
     r"job 3 \('meth'\).*unknown method 'blend'"),
])
def test_a_bad_job_is_named_and_finished_images_are_kept(studio, first_run, tmp_path, bad, message):
    _, out, _, _ = first_run
    manifest = (out / MANIFEST).read_bytes()
    pngs = {p.name: p.read_bytes() for p in out.glob("*.png")}
    jobfile = _write_jsonl(tmp_path / "jobs.jsonl", JOBS + [bad])
    with pytest.raises(BatchJobError, match=message):
        studio.generate_batch(jobfile, out=out, progress=False)
    assert (out / MANIFEST).read_bytes() == manifest
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == pngs


def test_bad_job_files_are_explained(studio, tmp_path):
    bad = tmp_path / "jobs.jsonl"
    bad.write_text('{"prompt": "a red star"}\n{"prompt": oops}\n')
    with pytest.raises(BatchJobError, match="line 2"):
        studio.generate_batch(bad, out=tmp_path / "o", progress=False)
    with pytest.raises(BatchJobError, match="unknown field"):
        studio.generate_batch([{"prompt": "a red star", "sed": 1}], out=tmp_path / "o", progress=False)
    with pytest.raises(BatchJobError, match="already used"):
        studio.generate_batch([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], out=tmp_path / "o")
    assert issubclass(BatchJobError, StudioInputError)


def test_studio_batch_command_reads_yaml_with_defaults(studio, tmp_path, capsys, monkeypatch):
    import studio.api as api

    made = []

    def fake_studio(**kw):  # the command's Studio: the module's (already loaded) one, after checking its arguments
        made.append(kw)
        return studio

    monkeypatch.setattr(api, "Studio", fake_studio)
    jobfile = tmp_path / "jobs.yaml"
    jobfile.write_text("defaults: {steps: 4, cfg: 5}\njobs:\n  - {id: star, prompt: a red star, seeds: [7]}\n"
                       "  - {id: hat, prompt: a blue square, loras: [[hat_r4_s0, 0.5]], seed: 1}\n")
    out = tmp_path / "out"
    assert main(["batch", str(jobfile), "--out", str(out), "--library", str(studio.library), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "2 image(s) of 2 job(s)" in text and "2 generated" in text and str(out.resolve()) in text
    assert made[0]["library"] == str(studio.library) and made[0]["device"] == "cpu"
    rec = read_recipe(out / "hat-seed1.png")
    assert (rec.steps, rec.cfg, rec.loras[0]["weight"]) == (4, 5.0, 0.5)
    assert read_recipe(out / "star-seed7.png").cfg == 5.0

    jobfile.write_text("jobs:\n  - {id: star, prompt: a red star, steps: 4, loras: [missing_one]}\n")
    assert main(["batch", str(jobfile), "--out", str(out), "--device", "cpu"]) == 2
    assert "job 0 ('star')" in capsys.readouterr().err
