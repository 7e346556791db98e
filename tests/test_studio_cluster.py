"""`Studio.cluster` and `studio cluster`: style clusters of a library from its weights, and the style map."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library
from studio.api import Studio, StudioInputError
from studio.cli import main

CONCEPTS = ["zorbo", "hat", "stripes"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster") / "lib"
    records = write_synthetic_library(folder, CONCEPTS, ranks=(4, 8), seeds=(0, 1), shapes=SMALL_TARGETS,
                                      name_style="concept")
    return folder, {r["name"]: r["concept"] for r in records}


@pytest.fixture(scope="module")
def studio(lib):
    torch.set_num_threads(1)
    return Studio(device="cpu", library=lib[0])


def test_cluster_groups_the_loras_of_each_concept_and_draws_the_map(studio, lib, tmp_path):
    _, concept_of = lib
    styles = studio.cluster(out_png=tmp_path / "map.png")
    groups = styles.groups()
    assert len(groups) == 3
    # every cluster holds the 4 LoRAs (2 ranks x 2 seeds) of one concept
    assert sorted(sorted({concept_of[m] for m in members}) for members in groups.values()) == \
        [["hat"], ["stripes"], ["zorbo"]]
    assert all(len(m) == 4 for m in groups.values())
    assert styles.map_png == str(tmp_path / "map.png")
    with Image.open(styles.map_png) as im:
        assert im.size[0] > 500 and im.size[1] > 500
    assert styles.to_dict()["k"] == 3


def test_cluster_with_a_fixed_k_and_rendered_previews(studio, lib, tmp_path):
    folder, _ = lib
    styles = studio.cluster(k=2, out_png=tmp_path / "map2.png", previews=True, preview_steps=2)
    assert len(styles.groups()) == 2 and sum(len(m) for m in styles.groups().values()) == 12
    previews = sorted((folder / ".studio" / "previews").glob("*.png"))
    assert len(previews) == 12  # one cached thumbnail per LoRA, reused next time
    stamp = [p.stat().st_mtime_ns for p in previews]
    studio.cluster(k=2, out_png=tmp_path / "map3.png", previews=True, preview_steps=2)
    assert [p.stat().st_mtime_ns for p in previews] == stamp
    with pytest.raises(StudioInputError, match="at least 1"):
        studio.cluster(k=0)
    with pytest.raises(StudioInputError, match=r"\.png"):
        studio.cluster(out_png=tmp_path / "map.jpg")


def test_studio_cluster_command_prints_clusters_and_the_map(lib, tmp_path, capsys):
    folder, concept_of = lib
    out = tmp_path / "styles.png"
    assert main(["cluster", "--library", str(folder), "--k", "3", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "12 tinyworld LoRA(s)" in text and "3 style cluster(s)" in text
    assert f"style map: {out.resolve()}" in text
    assert out.is_file()
    lines = [l for l in text.splitlines() if l.strip().startswith("[")]
    assert len(lines) == 3
    for name in concept_of:
        assert sum(name in l for l in lines) == 1  # each LoRA listed in exactly one cluster

    assert main(["cluster", "--library", str(folder), "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["k"] == 3 and (folder / ".studio" / "style_map.png").is_file()
    assert sorted(m for c in data["clusters"] for m in c["members"]) == sorted(concept_of)


def test_empty_library_is_refused_with_the_fix(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["cluster", "--library", str(empty), "--device", "cpu"]) == 2
    assert "no LoRA to cluster" in capsys.readouterr().err
