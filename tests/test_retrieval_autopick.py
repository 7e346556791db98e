"""Auto-pick on a synthetic TinyWorld library: caps, threshold, explanations, triggers, categories, Studio hooks."""
from types import SimpleNamespace

import pytest
import torch

from retrieval.autopick import (Pick, autopick, categories, category_from_metadata, explain, insert_triggers,
                                split_phrases)
from retrieval.library import LibraryIndex
from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library
from retrieval.text import HashingEmbedder
from studio.library.catalog import Catalog

CONCEPTS = ["zorbo", "glimmet", "botzy", "hat", "glasses", "scarf", "stripes", "polka", "checker", "starfield",
            "sunset", "ball", "key"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("autopick")
    records = write_synthetic_library(root / "loras", CONCEPTS, ranks=(4, 8), seeds=(0,), shapes=SMALL_TARGETS,
                                      dtype=torch.float16, name_style="concept")
    # bare files (no metadata at all) of two characters: their category must come from their weights
    write_synthetic_library(root / "loras" / "bare", ["zorbo", "glimmet"], ranks=(16,), seeds=(5,),
                            bare=("zorbo", "glimmet"), shapes=SMALL_TARGETS, dtype=torch.float16, name_style="concept")
    cat = Catalog(root / "loras" / ".studio" / "catalog.sqlite")
    cat.scan(root / "loras")
    index = LibraryIndex.open(cat, text_embedder=HashingEmbedder(128))
    return index, cat, records


def concept(pick: Pick) -> str:
    return pick.name.split("_r")[0]


def test_multi_concept_prompt_gets_one_lora_per_concept(lib):
    index, _, _ = lib
    picks = autopick("a floating ghost wearing dark round sunglasses on a night sky full of twinkling lights",
                     index, k=4, family="tinyworld")
    assert {concept(p) for p in picks} == {"glimmet", "glasses", "starfield"}
    assert {p.category for p in picks} == {"character", "clothing", "background"}


def test_caps_one_character_and_one_style(lib):
    index, _, _ = lib
    picks = autopick("a round alien creature and a floating ghost and a boxy robot, covered in white spots, "
                     "painted with bold diagonal bands", index, k=5, family="tinyworld")
    cats = [p.category for p in picks]
    assert cats.count("character") == 1 and cats.count("style") == 1
    relaxed = autopick("a round alien creature and a floating ghost", index, k=5, family="tinyworld",
                       caps={"character": 2})
    assert {concept(p) for p in relaxed} == {"zorbo", "glimmet"}


def test_threshold_nothing_fits(lib):
    index, _, _ = lib
    assert autopick("a motorcycle parked on a highway at noon", index, k=3, family="tinyworld") == []
    assert autopick("a floating ghost", index, k=3, family="tinyworld", threshold=1.01) == []
    assert explain([]) == "no LoRA fits this prompt"


def test_every_pick_is_explained(lib):
    index, _, _ = lib
    picks = autopick("a golden metal item for opening locks beside a striped beach toy", index, k=3,
                     family="tinyworld")
    assert {concept(p) for p in picks} == {"key", "ball"}
    for p in picks:
        assert p.score >= 0.3 and p.matched_words and p.trigger and p.phrase
        assert p.category in p.reason and all(w in p.reason for w in p.matched_words)
        assert set(p.channels) <= {"meta", "lexical", "neighbours", "weights", "joint", "trigger"}
    text = explain(picks)
    assert all(p.name in text for p in picks)
    assert picks[0].to_dict()["name"] == picks[0].name


def test_a_word_a_better_pick_explains_picks_nothing_more(lib):
    """"striped" describes the beach toy the ball LoRA's metadata names: the stripes style matched only that word
    of that phrase, so it is explained away however low the threshold; a striped ghost still gets the style."""
    index, _, _ = lib
    loose = autopick("a golden metal item for opening locks beside a striped beach toy", index, k=4,
                     family="tinyworld", threshold=0.0)
    assert "stripes" not in {concept(p) for p in loose} and {"key", "ball"} <= {concept(p) for p in loose}
    assert "stripes" in {concept(p) for p in autopick("a floating ghost, striped", index, k=3, family="tinyworld")}


def test_trigger_word_in_the_prompt_picks_its_lora(lib):
    index, _, _ = lib
    picks = autopick("a kronix-free glimmet on a plain floor", index, k=3, family="tinyworld")
    top = picks[0]
    assert concept(top) == "glimmet" and top.score == 1.0 and "trigger word" in top.reason
    # a generic word that kohya's tag list also calls a trigger word picks nothing by itself
    assert all(p.score < 1.0 for p in autopick("a large circle", index, k=3, family="tinyworld", threshold=0.0))
    # search ranks the same way: the LoRAs whose trigger word the prompt writes first, whatever else it says;
    # the weights-only mode reads no metadata, so no trigger word either
    named = set(index.named("glimmet on a plain background, red circle, centred", "tinyworld"))
    assert named and all(index.entries[i].trigger == "glimmet" for i in named)
    for mode in ("fused", "metadata"):
        hits = index.search("glimmet on a plain background, red circle, centred", k=5, family="tinyworld", mode=mode)
        assert {h.id for h in hits[:len(named)]} == named
    weights = index.search("glimmet on a plain background, red circle, centred", k=5, family="tinyworld", mode="weights")
    channel = next(iter(weights[0].raw))
    assert [h.raw[channel] for h in weights] == sorted((h.raw[channel] for h in weights), reverse=True)
    assert not index.named("a large circle on a plain background", "tinyworld")


def test_insert_triggers():
    ghost = Pick("g", "character", 0.8, ["ghost"], "glimmet", "")
    hat = Pick("h", "clothing", 0.7, ["hat"], "hatzel", "")
    style = Pick("s", "style", 0.6, [], "strypo", "")
    alien = Pick("z", "character", 0.9, ["alien"], "zorbix", "")
    assert insert_triggers("a ghost in a hat", [ghost, hat]) == "a glimmet ghost in a hatzel hat"
    assert insert_triggers("an alien", [alien]) == "a zorbix alien"
    assert insert_triggers("a ghost", [ghost, style]) == "strypo, a glimmet ghost"
    assert insert_triggers("a glimmet ghost", [ghost]) == "a glimmet ghost"  # already there
    assert insert_triggers("a ghost in a hat", [ghost, hat], mode="prepend") == "glimmet, hatzel, a ghost in a hat"
    assert insert_triggers("a ghost", [ghost, Pick("g2", "character", 0.5, ["ghost"], "glimmet", "")]) == \
        "a glimmet ghost"


def test_categories_from_tags_and_from_weights(lib):
    index, cat, _ = lib
    cats = categories(index)
    for e in cat.all():
        c, source = cats[e.id]
        if e.tags:
            assert source == "metadata" and c == category_from_metadata(e.tags, e.description)
        else:  # the bare character LoRAs
            assert source == "classifier" and c == "character", e.name
    assert category_from_metadata(["Style", "anime"]) == "style"
    assert category_from_metadata([], "a cozy background scenery") == "background"
    assert category_from_metadata(["cute"]) is None


def test_split_phrases():
    assert split_phrases("a ghost wearing a hat on a starry sky, pastel") == [
        "a ghost", "wearing a hat", "on a starry sky", "pastel"]
    assert split_phrases("the and of") == []


def test_studio_hooks(lib, monkeypatch):
    from fusion import LoRARef

    from retrieval import studio as hooks

    index, cat, _ = lib
    fake = SimpleNamespace(catalog=cat, family="tinyworld", library=None, model_path=None, pipe=None,
                           _retrieval_index=index)
    picks = hooks.retrieve(fake, "a boxy robot beside a golden metal item for opening locks", k=3)
    assert {concept(p) for p in picks} == {"botzy", "key"}
    prompt, refs, picks = hooks.auto_loras(fake, "a boxy robot beside a golden metal item for opening locks")
    assert all(isinstance(r, LoRARef) and r.category for r in refs)
    assert "botzyk" in prompt and "keyzo" in prompt
    prompts, refs2, _ = hooks.resolve_loras(fake, ["a boxy robot", "a boxy robot at dawn"], "auto")
    assert all("botzyk" in p for p in prompts) and [r.name for r in refs2]
    assert hooks.resolve_loras(fake, ["x"], ["a", "b"]) == (["x"], ["a", "b"], [])
    # <lora:...> tags: not searched, not picked twice, never edited by the trigger insertion
    tagged = "<lora:botzy_r4_s0:0.7> a boxy robot beside a golden metal item for opening locks"
    prompt, refs, _ = hooks.auto_loras(fake, tagged)
    assert prompt.startswith("<lora:botzy_r4_s0:0.7> ") and "keyzo" in prompt
    assert not any(r.name.startswith("botzy") for r in refs)
    assert insert_triggers("<lora:ghost:1> a ghost", [Pick("g", "character", 0.8, ["ghost"], "glimmet", "")]) == \
        "<lora:ghost:1> a glimmet ghost"
    other = SimpleNamespace(catalog=cat, family="sdxl", library=None, model_path=None, pipe=None,
                            _retrieval_index=index)
    assert hooks.retrieve(other, "a boxy robot") == []  # family filter: no SDXL LoRA in this library
