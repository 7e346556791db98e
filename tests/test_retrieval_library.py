"""LibraryIndex over a real catalog: build, persist, incremental refresh, staleness, family filter, modes."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.descriptor import lora_svds
from retrieval.encoder import TrainingPair, train_encoder
from retrieval.library import LibraryIndex, _FeaturizerPool
from retrieval.loading import load_for_index, read_factors
from retrieval.synthetic import SD15_TARGETS, SMALL_TARGETS, synthetic_lora, tinyworld_metadata, write_synthetic_library
from retrieval.text import HashingEmbedder, Metadata, captions
from studio.library.catalog import Catalog
from studio.library.formats import read_lora, write_lora

CONCEPTS = ["zorbo", "glimmet", "hat", "glasses", "stripes", "polka", "checker", "starfield", "ball", "key"]


def _write_sd15_ghost(folder):
    """An SD1.5 LoRA whose metadata says exactly what the TinyWorld ghost LoRA says."""
    lora = synthetic_lora("glimmet", 4, 0, shapes=SD15_TARGETS, family="sd15")
    lora.metadata, info = tinyworld_metadata("glimmet", 4, 0)
    path = write_lora(lora, folder / "sd15_ghost.safetensors")
    path.with_suffix(".civitai.info").write_text(json.dumps(info))
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    records = write_synthetic_library(root / "loras", CONCEPTS, ranks=(4, 8), seeds=(0,), shapes=SMALL_TARGETS,
                                      dtype=torch.float16)
    _write_sd15_ghost(root / "loras")
    return root, records


def _catalog(root, tmp_path):
    """A private copy of the library (tests change files) and its scanned catalog."""
    lib = tmp_path / "loras"
    shutil.copytree(root / "loras", lib)
    cat = Catalog(lib / ".studio" / "catalog.sqlite")
    cat.scan(lib)
    return cat, lib


def test_build_persist_and_reopen(library, tmp_path):
    cat, lib = _catalog(library[0], tmp_path)
    emb = HashingEmbedder(64)
    index = LibraryIndex.open(cat, text_embedder=emb)
    assert len(index) == len(CONCEPTS) * 2 + 1
    for p in (index.index_path, index.manifest_path, index.descriptor_path):
        assert p.is_file() and p.parent == cat.db_path.parent
    assert index.index_path.name == "catalog.sqlite.faiss"
    hits = index.search("a floating ghost with a wavy hem", k=4, family="tinyworld")
    ghosts = {e.name for e in cat.all() if "ghost" in e.description and e.family == "tinyworld"}
    # the two ghost LoRAs are versions of one model: the best first, the other after two other models
    assert hits[0].name in ghosts and hits[3].name in ghosts and len({h.model for h in hits[:3]}) == 3
    again = LibraryIndex(cat, text_embedder=emb)
    report = again.refresh()
    assert not report.rebuilt and not report.changed
    before = [h.id for h in index.search("a floating ghost", k=5)]
    assert [h.id for h in again.search("a floating ghost", k=5)] == before


def test_incremental_add_remove_update(library, tmp_path):
    cat, lib = _catalog(library[0], tmp_path)
    emb = HashingEmbedder(64)
    index = LibraryIndex.open(cat, text_embedder=emb)
    n = len(index)
    # add
    extra = synthetic_lora("cup", 4, 0, shapes=SMALL_TARGETS)
    extra.metadata, info = tinyworld_metadata("cup", 4, 0)
    path = write_lora(extra, lib / "new_cup.safetensors")
    path.with_suffix(".civitai.info").write_text(json.dumps(info))
    cat.scan(lib)
    report = LibraryIndex(cat, text_embedder=emb).refresh()
    assert report.added == ["new_cup"] and not report.removed and not report.rebuilt
    index = LibraryIndex.open(cat, text_embedder=emb)
    assert len(index) == n + 1 and index.search("a steaming mug", k=1)[0].name == "new_cup"
    # update: new sidecar text -> re-indexed with the new metadata
    info["description"] = "a shiny trumpet for jazz"
    info["model"]["description"] = "a shiny trumpet for jazz"
    path.with_suffix(".civitai.info").write_text(json.dumps(info))
    cat.scan(lib)
    report = index.refresh()
    assert report.added == ["new_cup"] and report.removed == ["new_cup"]
    assert index.search("trumpet", k=1)[0].name == "new_cup"
    # remove
    path.unlink()
    path.with_suffix(".civitai.info").unlink()
    cat.scan(lib)
    report = index.refresh()
    assert report.removed == ["new_cup"] and len(index) == n
    assert all(h.name != "new_cup" for h in index.search("trumpet", k=50))
    assert LibraryIndex(cat, text_embedder=emb).refresh().changed is False


def test_rebuilt_when_missing_corrupt_or_incompatible(library, tmp_path):
    cat, lib = _catalog(library[0], tmp_path)
    index = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64))
    index.index_path.write_bytes(b"\0" * 32)
    report = LibraryIndex(cat, text_embedder=HashingEmbedder(64)).refresh()
    assert report.rebuilt and "unreadable" in report.reason
    report = LibraryIndex(cat, text_embedder=HashingEmbedder(32)).refresh()  # another embedder: stale vectors
    assert report.rebuilt and "changed" in report.reason
    index.manifest_path.unlink()
    report = LibraryIndex(cat, text_embedder=HashingEmbedder(32)).refresh()
    assert report.rebuilt and report.reason == "no index on disk"
    # a save interrupted between the two files: generations differ
    good = LibraryIndex.open(cat, text_embedder=HashingEmbedder(32))
    manifest = json.loads(good.manifest_path.read_text())
    manifest["generation"] = "0" * 16
    good.manifest_path.write_text(json.dumps(manifest))
    assert LibraryIndex(cat, text_embedder=HashingEmbedder(32)).refresh().rebuilt


def test_family_is_a_hard_filter(library, tmp_path):
    cat, lib = _catalog(library[0], tmp_path)
    index = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64))
    sd15 = cat.get("sd15_ghost")
    assert sd15.family == "sd15"
    prompt = "a floating ghost with a wavy hem and dark eyes, glimmet"
    for mode in ("fused", "metadata", "lexical", "meta"):
        tiny = index.search(prompt, k=50, family="tinyworld", mode=mode)
        assert tiny and all(h.family == "tinyworld" for h in tiny)
        assert sd15.id not in {h.id for h in tiny}
    only = index.search(prompt, k=5, family="sd15")
    assert [h.id for h in only] == [sd15.id]
    assert sd15.id in {h.id for h in index.search(prompt, k=5)}  # no family: every family
    assert all(h.family == "tinyworld" for h in index.similar(cat.get("lora_0002").id, k=30))


def test_modes_channels_and_similar(library, tmp_path):
    cat, lib = _catalog(library[0], tmp_path)
    emb = HashingEmbedder(64)
    with pytest.raises(ValueError, match="trained encoder"):
        LibraryIndex.open(cat, text_embedder=emb).search("a ghost", mode="encoder")
    records = {r["name"]: r for r in library[1]}
    pairs = []
    for e in cat.all():
        if e.name in records and records[e.name]["rank"] == 4:
            m = Metadata.of(e)
            pairs.append(TrainingPair(lora_svds(cat.load(e.id), 4), captions(m), records[e.name]["concept"],
                                      m.text(), e.family))
    enc, _ = train_encoder(pairs, emb, steps=40, batch_size=10, hidden=32, layers=1, heads=2)
    index = LibraryIndex.open(cat, text_embedder=emb, encoder=enc)
    assert set(index.vectors) == {"descriptor", "meta", "neighbours", "weights", "joint"}
    assert sd15_not_encoded(index, cat)
    hits = index.search("wearing dark round sunglasses", k=3, mode="encoder", family="tinyworld")
    assert hits and set(hits[0].channels) == {"weights"}
    hits = index.search("wearing dark round sunglasses", k=3, mode="weights", family="tinyworld")
    assert hits and set(hits[0].channels) == {"neighbours"}
    fused = index.search("wearing dark round sunglasses", k=3, family="tinyworld")
    assert set(fused[0].channels) == {"joint", "meta", "lexical"} and fused[0].matched
    assert records[fused[0].name]["concept"] == "glasses"
    assert all(0 <= h.score <= 1 for h in fused)
    # descriptor neighbours: the other rank of the same concept comes first
    for name, rec in list(records.items())[:6]:
        near = index.similar(name, k=1)[0]
        assert records[near.name]["concept"] == rec["concept"]


def sd15_not_encoded(index, cat):
    """The encoder was trained on TinyWorld LoRAs: other families get no weights vector."""
    return cat.get("sd15_ghost").id not in index.members["weights"]


def test_index_reader_keeps_the_catalog_family_and_reads_every_format(library, tmp_path):
    path = library[1][0]["path"]
    ref = read_lora(path)
    modules, family, metadata = read_factors(path, "sd15")   # the catalog's family (e.g. from a sidecar) wins
    assert family == "sd15" and metadata == ref.metadata and set(modules) == set(ref.modules)
    lora = load_for_index(path)
    assert lora.family == ref.family
    for name, m in ref.modules.items():
        assert torch.allclose(lora.modules[name].delta_weight(), m.delta_weight(), atol=1e-3)
    diff = write_lora(ref, tmp_path / "d.safetensors", format="diffusers")
    a, b = lora_svds(load_for_index(diff, "tinyworld"), 4), lora_svds(ref, 4)
    assert all(torch.allclose(a[n].S, b[n].S, rtol=1e-3) for n in b)


def test_worker_processes_give_the_same_vectors(library, tmp_path, monkeypatch):
    cat, lib = _catalog(library[0], tmp_path)
    local = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64), workers=1)
    vec = {i: local.vector("descriptor", i) for i in local.entries}
    local.index_path.unlink()
    monkeypatch.setattr(_FeaturizerPool, "MIN_FILES_FOR_POOL", 0)
    monkeypatch.setattr(_FeaturizerPool, "CHUNK", 8)
    pooled = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64), workers=2, stored_features=False)   # read
    assert set(pooled.entries) == set(vec)
    for i, v in vec.items():
        assert np.allclose(pooled.vector("descriptor", i), v, atol=1e-5)
    # with an encoder: the workers load it from a temporary file (removed after), the same weights vectors (up to
    # bf16 rounding in other batches) as this process's encoder
    import tempfile

    records = {r["name"]: r for r in library[1]}
    pairs = [TrainingPair(lora_svds(cat.load(e.id), 4), captions(Metadata.of(e)), records[e.name]["concept"],
                          Metadata.of(e).text(), e.family) for e in cat.all() if e.name in records]
    enc, _ = train_encoder(pairs, HashingEmbedder(64), steps=5, batch_size=10, hidden=32, layers=1, heads=2)
    temps = lambda: set(Path(tempfile.gettempdir()).glob("lora_studio_encoder_*"))  # noqa: E731
    before = temps()
    runs = [LibraryIndex(cat, text_embedder=HashingEmbedder(64), encoder=enc, workers=w) for w in (1, 2)]
    for index in runs:
        index.rebuild()
    assert temps() == before
    ids = sorted(runs[0].members["weights"])
    assert ids and sorted(runs[1].members["weights"]) == ids
    for i in ids:
        assert float(runs[0].vector("weights", i) @ runs[1].vector("weights", i)) > 0.999


def test_scores_are_calibrated_against_the_query_own_baseline(library, tmp_path):
    """A channel score is (s - m) / (1 - m), m the prompt's median similarity over the library: a LoRA as close to
    the prompt as a typical unrelated one scores 0, whatever the prompt's overall level of similarity."""
    cat, _ = _catalog(library[0], tmp_path)
    index = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64))
    prompt = "a floating ghost with a wavy hem"
    hits = index.search(prompt, k=len(index), mode="meta")
    q = index.text.encode([prompt])[0]
    bg = index._background("meta")
    assert bg is not None and len(bg) == len(index.members["meta"])
    m = float(np.median(bg @ q))
    for h in hits:
        expected = np.clip((h.raw["meta"] - m) / (1 - m), 0, 1)
        assert abs(h.channels["meta"] - expected) < 1e-6
    assert hits[0].channels["meta"] > 0.3 and sum(h.channels["meta"] == 0 for h in hits) >= len(hits) // 2 - 1


def test_blocks_stored_by_the_scan_give_the_same_index_as_reading_the_files(library, tmp_path, monkeypatch):
    """The index uses the descriptor blocks the catalog scan stored (no file read) and reads only the files of
    LoRAs without them (a catalog from before features, another descriptor setting) and, for the encoder alone,
    those of the LoRAs an encoder encodes; every way gives the same vectors."""
    import sqlite3

    import retrieval.library as library_module
    from retrieval.descriptor import DescriptorConfig, blocks_fingerprint

    cat, lib = _catalog(library[0], tmp_path)
    emb = HashingEmbedder(64)
    reads = []

    def counting(path, family=None):
        reads.append(path)
        return read_factors(path, family)

    monkeypatch.setattr(library_module, "read_factors", counting)
    n = len(cat.all())
    assert len(cat.feature_ids(blocks_fingerprint(DescriptorConfig()))) == n

    def vectors(**kw):
        reads.clear()
        index = LibraryIndex(cat, text_embedder=emb, workers=1, **kw)
        report = index.rebuild()
        encoded = len(reads) if kw.get("encoder") is not None and kw.get("stored_features", True) else 0
        assert (report.files_read, report.from_catalog) == (len(reads), n - len(reads) + encoded)
        return {ch: {i: index.vector(ch, i) for i in index.members[ch]} for ch in index.vectors}, len(reads)

    def same(a, b):
        assert a.keys() == b.keys()
        for ch in a:
            assert a[ch].keys() == b[ch].keys() and a[ch]
            for i, v in a[ch].items():
                assert np.allclose(v, b[ch][i], atol=1e-5), (ch, i, float(np.abs(v - b[ch][i]).max()))

    from_catalog, n_read = vectors()
    assert n_read == 0
    from_files, n_read = vectors(stored_features=False)
    assert n_read == n
    same(from_catalog, from_files)
    # with an encoder: the LoRAs it encodes (tinyworld) are read for their factors, the sd15 one is not
    records = {r["name"]: r for r in library[1]}
    pairs = [TrainingPair(lora_svds(cat.load(e.id), 4), captions(Metadata.of(e)), records[e.name]["concept"],
                          Metadata.of(e).text(), e.family) for e in cat.all() if e.name in records]
    enc, _ = train_encoder(pairs, emb, steps=5, batch_size=10, hidden=32, layers=1, heads=2)
    with_enc, n_read = vectors(encoder=enc)   # every LoRA's blocks from the catalog, the files for the encoder
    assert n_read == sum(e.family == "tinyworld" for e in cat.all()) < n
    plain, _ = vectors(encoder=enc, stored_features=False)
    same(with_enc, plain)
    assert set(with_enc) == {"descriptor", "meta", "neighbours", "weights", "joint"}
    same({"descriptor": with_enc["descriptor"]}, {"descriptor": from_files["descriptor"]})
    # some rows without features (as after migrating a catalog from before them): their files are read
    gone = sorted(e.id for e in cat.all())[::2]
    with sqlite3.connect(cat.db_path) as db:
        db.executemany("DELETE FROM features WHERE lora_id = ?", [(i,) for i in gone])
    mixed, n_read = vectors()
    assert n_read == len(gone)
    same(mixed, from_files)
    # rows stored before init fingerprints (a schema-3 catalog migrated): their files are read for them
    kept = sorted(set(e.id for e in cat.all()) - set(gone))[:3]
    with sqlite3.connect(cat.db_path) as db:
        db.executemany("UPDATE features SET init_print = NULL WHERE lora_id = ?", [(i,) for i in kept])
    mixed, n_read = vectors()
    assert n_read == len(gone) + len(kept)
    same(mixed, from_files)
    # another descriptor setting: the stored blocks do not fit, every file is read
    other, n_read = vectors(descriptor_config=DescriptorConfig(top_k=3))
    assert n_read == n and other["descriptor"].keys() == from_files["descriptor"].keys()


def test_text_vectors_stored_by_a_pooled_scan_are_the_ones_the_index_would_embed(tmp_path, monkeypatch):
    """A scan that reads its files in worker processes stores each readable file's metadata-text vector from the
    packaged sentence model; an index with that embedder uses them instead of embedding (same vectors within bf16
    batching noise), an index with another embedder embeds its own; a file read again in-process loses its stored
    vector (the index embeds its text)."""
    import studio.library.catalog as catalog_module
    from retrieval.text import default_text_embedder, packaged_model_folder, text_key
    from studio.tinyworld.catalog import CONCEPTS as ALL

    if packaged_model_folder() is None:
        pytest.skip("no packaged sentence model")
    monkeypatch.setattr(catalog_module, "TEXT_MIN_FILES", 0)
    lib = tmp_path / "lib"
    write_synthetic_library(lib, [c.name for c in ALL], ranks=(4,), seeds=(0, 1, 2), shapes=SMALL_TARGETS)
    (lib / "broken.safetensors").write_bytes(b"\x00" * 64)
    text = default_text_embedder(prefer="sentence")
    pooled, local = Catalog(tmp_path / "pooled.sqlite"), Catalog(tmp_path / "local.sqlite")
    assert len(pooled.scan(lib, workers=2).quarantined) == 1
    local.scan(lib, workers=1)
    entries = pooled.all()
    stored = pooled.text_vectors([e.id for e in entries], text.fingerprint())
    assert set(stored) == {e.id for e in entries}
    assert pooled.text_vectors([e.id for e in entries], HashingEmbedder(64).fingerprint()) == {}
    assert local.text_vectors([e.id for e in local.all()], text.fingerprint()) == {}   # an in-process scan: none
    texts = [Metadata.of(e).text() for e in entries]
    for e, t, ref in zip(entries, texts, text.encode(texts)):
        key, v = stored[e.id]
        assert key == text_key(t) and float(v @ ref) > 0.9999

    def meta_vectors(cat, embedder):
        index = LibraryIndex(cat, text_embedder=embedder, workers=1)
        report = index.rebuild()
        return {index.entries[i].name: index.vector("meta", i) for i in index.members["meta"]}, report

    from_scan, report = meta_vectors(pooled, text)
    embedded, local_report = meta_vectors(local, text)
    indexed = [t for e, t in zip(entries, texts) if e.status == "ok"]
    assert report.texts_from_catalog == len(set(indexed)) and local_report.texts_from_catalog == 0
    assert from_scan.keys() == embedded.keys() and from_scan
    assert all(float(from_scan[n] @ embedded[n]) > 0.9999 for n in from_scan)
    assert meta_vectors(pooled, HashingEmbedder(64))[1].texts_from_catalog == 0

    first = next(e for e in entries if e.status == "ok")
    first.path.with_suffix(".civitai.info").write_text(json.dumps({"trainedWords": ["zzq"]}))   # new metadata
    pooled.scan(lib, workers=2)   # one changed file: read in this process, its stored vector dropped
    assert first.id not in pooled.text_vectors([first.id], text.fingerprint())
    assert len(pooled.text_vectors([e.id for e in entries], text.fingerprint())) == len(entries) - 1
    pooled.close()
    local.close()


def test_manifest_entries_are_the_dataclass_fields():
    """The manifest writes entries without `asdict`'s deep copies: the same keys and values (a field added to
    `IndexedEntry` or `Metadata` must be written too)."""
    from dataclasses import asdict

    from retrieval.library import IndexedEntry, _entry_json

    e = IndexedEntry(3, "zorbo_v1", "tinyworld", "s", Metadata("zorbo_v1", ["zorbo"], "an alien", ["alien"], "Zorbo"),
                     "/lib/zorbo_v1.safetensors")
    assert _entry_json(e) == {**asdict(e), "meta": asdict(e.meta)}


def test_versions_of_one_model_are_listed_apart(library, tmp_path):
    """Two ranks of one concept (one Civitai model: the same model name, trigger word and description) are versions
    of one model; a LoRA without metadata is a model of its own; fused search lists a model's further versions
    after the next two other models' best, LoRAs the prompt names by trigger word first."""
    from retrieval.library import Hit

    cat, lib = _catalog(library[0], tmp_path)
    by_concept = {}
    for r in library[1]:
        by_concept.setdefault(r["concept"], []).append(cat.get(r["name"]).id)
    hat = read_lora(library[1][[r["concept"] for r in library[1]].index("hat")]["path"])
    for m in hat.modules.values():   # a near copy of a hat LoRA, with no metadata at all
        m.factors["up"] = m.factors["up"] * 1.01
    hat.metadata = {}
    write_lora(hat, lib / "bare_hat.safetensors")
    cat.scan(lib)
    index = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64))
    z1, z2 = by_concept["zorbo"]
    assert index.model_of(z1) == index.model_of(z2) != index.model_of(by_concept["glimmet"][0])
    bare = cat.get("bare_hat").id
    assert index.entries[bare].trigger is None and index.model_of(bare) == "bare_hat"
    assert index.model_of(by_concept["hat"][0]) == index.model_of(by_concept["hat"][1]) != "bare_hat"

    def hit(i):
        return Hit(i, index.entries[i].name, "tinyworld", 1.0)

    g, h, k = by_concept["glimmet"][0], by_concept["hat"][0], by_concept["key"][0]
    order = [x.id for x in index._versions_after([hit(i) for i in (z1, z2, g, h, k)])]
    assert order == [z1, g, h, z2, k]
    assert [x.id for x in index._versions_after([hit(i) for i in (z1, z2, g)])] == [z1, g, z2]   # none after
    assert [x.id for x in index._versions_after([hit(i) for i in (z1, z2, g)], named={z1, z2})] == [z1, z2, g]
    top = index.search("a round alien creature with two antennae", k=3, family="tinyworld")
    assert len({x.model for x in top}) == 3 and all(x.model for x in top)
