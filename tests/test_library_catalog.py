"""The SQLite LoRA catalog: indexing, sidecars, duplicates, quarantine, incremental rescans, SIGKILL safety."""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library_fixtures import small_kohya_file, write_diffusers, write_kohya
from studio.library.catalog import DEFAULT_FEATURES, SCHEMA_VERSION, Catalog, file_hashes

ROOT = Path(__file__).resolve().parents[1]


def check_consistent(db_path: Path) -> sqlite3.Connection:
    """Integrity check plus the catalog's own invariants; returns an open connection."""
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    # stored features belong to a readable row with the same tensors, and their layout exists
    assert db.execute("SELECT COUNT(*) FROM features f LEFT JOIN loras l ON l.id = f.lora_id LEFT JOIN feature_layouts"
                      " fl ON fl.id = f.layout WHERE l.id IS NULL OR l.status = 'quarantined' OR"
                      " l.tensor_hash != f.tensor_hash OR fl.id IS NULL").fetchone()[0] == 0
    # so do stored text vectors
    assert db.execute("SELECT COUNT(*) FROM text_vectors t LEFT JOIN loras l ON l.id = t.lora_id"
                      " WHERE l.id IS NULL OR l.status = 'quarantined'").fetchone()[0] == 0
    rows = db.execute("SELECT id, status, duplicate_of, tensor_hash, file_sha256, family, n_modules, reason, fix,"
                      " trigger_words, metadata FROM loras").fetchall()
    by_id = {r[0]: r for r in rows}
    for id_, status, dup, thash, sha, family, n, reason, fix, triggers, metadata in rows:
        assert len(sha) == 64 and isinstance(json.loads(triggers), list) and isinstance(json.loads(metadata), dict)
        if status == "quarantined":
            assert reason and fix and thash is None
        else:
            assert thash and family and n > 0 and reason is None
            if status == "duplicate":
                original = by_id[dup]
                assert original[1] == "ok" and original[3] == thash and original[0] < id_
            else:
                assert dup is None
    originals = db.execute("SELECT tensor_hash, COUNT(*) FROM loras WHERE status = 'ok' GROUP BY tensor_hash").fetchall()
    assert all(count == 1 for _, count in originals)
    return db


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "loras"
    (lib / "styles").mkdir(parents=True)
    write_kohya(lib / "styles" / "zqx.safetensors", "tinyworld", seed=1)
    (lib / "styles" / "zqx.civitai.info").write_text(json.dumps({
        "trainedWords": ["zqx", "glowing, neon"], "baseModel": "SD 1.5", "description": "<p>Version notes</p>",
        "model": {"name": "ZQX Neon", "description": "<p>A <b>neon</b> style</p>", "tags": ["style", {"name": "neon"}]},
        "images": [{"url": "x"}],
    }))
    (lib / "styles" / "zqx.preview.png").write_bytes(b"\x89PNG fake")
    write_diffusers(lib / "sd15_diffusers.safetensors", "sd15", seed=2)
    (lib / "sd15_diffusers.json").write_text(json.dumps({"description": "A1111 note", "activation text": "foo bar, baz",
                                                         "sd version": "SD1"}))
    write_kohya(lib / "xl.safetensors", "sdxl", seed=3)
    # same tensors, different metadata: a duplicate by tensor hash, not by file hash
    write_kohya(lib / "copy_of_zqx.safetensors", "tinyworld", seed=1, metadata={"ss_output_name": "renamed"})
    data = (lib / "xl.safetensors").read_bytes()
    (lib / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    sd = write_kohya(lib / "nan.safetensors", "tinyworld", seed=4)
    key = sorted(sd)[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, lib / "nan.safetensors")
    torch.save({"a": torch.zeros(2)}, lib / "pickled.pt")
    return lib


def test_scan_indexes_everything(tmp_path, library):
    with Catalog(tmp_path / "catalog.db") as catalog:
        report = catalog.scan(library)
        assert len(report.added) == 7 and len(report.quarantined) == 3 and len(report.duplicates) == 1
        assert report.duplicates == ["zqx.safetensors has the same tensors as copy_of_zqx.safetensors"]
        text = str(report)
        for name in ("truncated.safetensors", "nan.safetensors", "pickled.pt"):
            assert name in text
        assert "7 added" in text and "3 quarantined" in text

        zqx = catalog.get("zqx")
        assert zqx.status == "duplicate" and zqx.family == "tinyworld" and zqx.format == "kohya"
        assert zqx.kinds == ["locon", "lora"] and zqx.ranks == [2, 4] and zqx.n_modules > 100
        assert zqx.components["text_encoder"] == 16
        assert zqx.trigger_words[:5] == ["zqx style", "blue glow", "zqx", "glowing", "neon"]
        assert zqx.alias == "test_lora" and zqx.tags == ["style", "neon"] and zqx.description == "A neon style"
        assert zqx.preview == library / "styles" / "zqx.preview.png"
        assert zqx.sidecar["civitai"]["baseModel"] == "SD 1.5" and "images" not in zqx.sidecar["civitai"]
        assert "sidecar files say sd15 but the tensors say tinyworld" in zqx.warnings
        sha, thash = file_hashes(zqx.path)
        assert (zqx.file_sha256, zqx.tensor_hash) == (sha, thash) and sha != thash

        copy = catalog.get("copy_of_zqx")  # scanned first, so the original
        assert copy.status == "ok" and zqx.duplicate_of == copy.id and copy.tensor_hash == zqx.tensor_hash
        assert copy.file_sha256 != zqx.file_sha256 and catalog.get("renamed").id == copy.id

        sd15 = catalog.get("sd15_diffusers")
        assert sd15.family == "sd15" and sd15.format == "diffusers" and sd15.description == "A1111 note"
        assert sd15.trigger_words == ["foo bar", "baz"]
        assert catalog.get("xl").family == "sdxl" and catalog.get("xl").components["text_encoder_2"] == 2

        bad = {e.path.name: e for e in catalog.quarantined()}
        assert set(bad) == {"truncated.safetensors", "nan.safetensors", "pickled.pt"}
        assert "truncated" in bad["truncated.safetensors"].reason and "NaN" in bad["nan.safetensors"].reason
        assert "pickle" in bad["pickled.pt"].reason and bad["pickled.pt"].fix
        assert "nan.safetensors" in bad["nan.safetensors"].one_line()
        assert [e.name for e in catalog.all()] == ["copy_of_zqx", "sd15_diffusers", "xl", "zqx"]

        lora = catalog.load("zqx")
        assert lora.family == "tinyworld" and len(lora.modules) == zqx.n_modules
        assert catalog.get(zqx.id).path == zqx.path and catalog.get(str(zqx.path)).id == zqx.id
        with pytest.raises(KeyError, match="did you mean zqx"):
            catalog.get("zqy")
        with pytest.raises(KeyError, match="quarantined"):
            catalog.get("nan")
    db = check_consistent(tmp_path / "catalog.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rescans_are_incremental(tmp_path, library):
    catalog = Catalog(tmp_path / "catalog.db")
    catalog.scan(library)
    again = catalog.scan(library)
    assert again.unchanged == 7 and not (again.added or again.updated or again.removed or again.quarantined)

    zqx = library / "styles" / "zqx.safetensors"
    os.utime(zqx, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
    assert catalog.scan(library).unchanged == 7

    (library / "styles" / "zqx.json").write_text(json.dumps({"activation text": "new words"}))
    report = catalog.scan(library)
    assert report.updated == [str(zqx)] and "new words" in catalog.get("zqx").trigger_words

    small_kohya_file(library / "xl.safetensors", seed=9)  # replaced content
    report = catalog.scan(library)
    assert report.updated == [str(library / "xl.safetensors")] and catalog.get("xl").family == "tinyworld"

    copy = library / "copy_of_zqx.safetensors"
    copy_id = catalog.get("copy_of_zqx").id
    assert catalog.get("zqx").duplicate_of == copy_id
    copy.unlink()  # the original goes: its duplicate takes over
    report = catalog.scan(library)
    assert report.removed == [str(copy)]
    with pytest.raises(KeyError):
        catalog.get(copy_id)
    assert catalog.get("zqx").status == "ok" and catalog.get("zqx").duplicate_of is None

    data = (library / "nan.safetensors").read_bytes()  # a fixed file leaves quarantine
    write_kohya(library / "nan.safetensors", "tinyworld", seed=4)
    assert (library / "nan.safetensors").read_bytes() != data
    catalog.scan(library)
    assert catalog.get("nan").status == "ok"
    catalog.close()
    check_consistent(tmp_path / "catalog.db")


def _rows(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(db_path, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM loras").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_scan_survives_sigkill(tmp_path):
    lib = tmp_path / "many"
    lib.mkdir()
    for i in range(200):
        name = lib / f"lora_{i:03d}.safetensors"
        if i % 25 == 7:
            name.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
        elif i % 40 == 11:
            shutil.copy(lib / f"lora_{i - 1:03d}.safetensors", name)
        else:
            small_kohya_file(name, seed=i)
    db_path = tmp_path / "catalog.db"
    script = "import sys; from studio.library.catalog import Catalog; Catalog(sys.argv[1]).scan(sys.argv[2])"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rng = random.Random(1234)
    counts = [0]
    for run in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(db_path), str(lib)], env=env)
        if run == 0:  # a random moment of start-up: import, schema creation or the first file
            deadline = time.monotonic() + rng.uniform(0, 2.0)
            target = 1
        else:  # once this run has indexed a random number of further files
            deadline = time.monotonic() + 60
            target = rng.randint(counts[-1] + 1, max(counts[-1] + 1, counts[-1] + (200 - counts[-1]) // 2))
        while proc.poll() is None and time.monotonic() < deadline and _rows(db_path) < target:
            time.sleep(0.002)
        proc.kill()  # SIGKILL
        proc.wait()
        if db_path.exists():
            check_consistent(db_path).close()
        counts.append(_rows(db_path))
    assert counts == sorted(counts) and any(0 < c < 200 for c in counts), counts
    with Catalog(db_path) as catalog:
        report = catalog.scan(lib)
        assert report.unchanged == counts[-1] and len(report.added) == 200 - counts[-1] and counts[-1] < 200
        assert len(catalog.all()) == 192 and len(catalog.quarantined()) == 8
        assert sum(e.status == "duplicate" for e in catalog.all()) == 5
    check_consistent(db_path)


def test_a_big_scan_reads_files_in_worker_processes_with_the_same_result(tmp_path):
    """Above POOL_MIN_FILES new files a scan reads them in a process pool; the catalog equals a one-process scan."""
    from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library
    from studio.library.catalog import POOL_MIN_FILES

    from studio.tinyworld.catalog import CONCEPTS

    lib = tmp_path / "lib"
    write_synthetic_library(lib, [c.name for c in CONCEPTS], ranks=(4,), seeds=(0, 1, 2), shapes=SMALL_TARGETS)
    (lib / "broken.safetensors").write_bytes(b"\x00" * 64)
    n = len(list(lib.rglob("*.safetensors")))
    assert n > POOL_MIN_FILES
    rows = {}
    for workers in (1, 2):
        with Catalog(tmp_path / f"c{workers}.sqlite") as catalog:
            report = catalog.scan(lib, workers=workers)
            assert len(report.added) == n and len(report.quarantined) == 1
            rows[workers] = {(e.path.name, e.status, e.tensor_hash, tuple(e.trigger_words), e.reason)
                             for e in catalog.all() + catalog.quarantined()}
            assert catalog.scan(lib, workers=workers).unchanged == n   # a rescan reads nothing
    assert rows[1] == rows[2]
    import multiprocessing

    assert multiprocessing.active_children() == []   # the pool's workers end with the scan


def test_scan_batches_are_big_for_many_files_and_spread_for_few():
    from studio.library.catalog import SCAN_BATCH, scan_batches

    many = [Path(f"{i}.safetensors") for i in range(10_000)]
    assert {len(b) for b in scan_batches(many, 2)} == {SCAN_BATCH, 10_000 % SCAN_BATCH}
    few = many[:100]
    batches = scan_batches(few, 2)
    assert len(batches) >= 8 and [p for b in batches for p in b] == few   # every worker gets work, in order
    assert scan_batches([], 2) == []


def test_rare_collections_restores_the_thresholds():
    import gc

    from studio.gc_pause import BULK_THRESHOLD, rare_collections

    before = gc.get_threshold()
    with rare_collections():
        assert gc.get_threshold()[0] == max(before[0], BULK_THRESHOLD)
        with rare_collections():
            pass
    assert gc.get_threshold() == before


def test_a_pool_scan_from_an_unguarded_script_falls_back_to_one_process(tmp_path):
    """Spawned workers re-run a script that has no `if __name__ == "__main__":` guard and die; the scan then
    reads the files itself (with a warning) and the catalog is complete."""
    import subprocess
    import sys
    import textwrap

    from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library
    from studio.tinyworld.catalog import CONCEPTS

    lib = tmp_path / "lib"
    write_synthetic_library(lib, [c.name for c in CONCEPTS], ranks=(4,), seeds=(0, 1, 2), shapes=SMALL_TARGETS)
    n = len(list(lib.rglob("*.safetensors")))
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import warnings
        from studio.library.catalog import Catalog
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = Catalog({str(tmp_path / 'c.sqlite')!r}).scan({str(lib)!r}, workers=2)
        print("ADDED", len(report.added), any("worker processes failed" in str(w.message) for w in caught))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert f"ADDED {n} True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_scan_stores_descriptor_features_with_each_row(tmp_path, library, monkeypatch):
    """Every readable file gets the weight descriptor's raw blocks, computed from the LoRA the scan read; they are
    replaced, and deleted, together with the file's row."""
    import numpy as np

    from retrieval.descriptor import DescriptorConfig, blocks_fingerprint, lora_svds, raw_blocks
    from retrieval.shared_init import INIT_DIM, init_fingerprints

    cfg = DescriptorConfig()
    fp = blocks_fingerprint(cfg)
    db_path = tmp_path / "catalog.db"
    with Catalog(db_path) as catalog:
        catalog.scan(library)
        assert catalog.feature_ids(fp) == {e.id: e.tensor_hash for e in catalog.all()}   # duplicates too
        assert catalog.feature_ids("blocks:another-config") == {}
        zqx = catalog.get("zqx")
        stored = catalog.stored_features([zqx.id], fp)[zqx.id]
        ref = raw_blocks(lora_svds(catalog.load(zqx.id), cfg.top_k), cfg)
        assert stored.names == list(ref) and stored.blocks.dtype == np.float16
        assert stored.blocks.shape == (zqx.n_modules, cfg.stored_block)
        assert np.allclose(stored.blocks, np.stack(list(ref.values())), atol=2e-3)
        assert stored.init_print.dtype == np.float16 and stored.init_print.shape == (INIT_DIM,)
        assert np.allclose(stored.init_print, init_fingerprints([catalog.load(zqx.id)])[0], atol=1e-3)
        # features computed one file at a time (a batch is cut at SCAN_BATCH_BYTES) are the batch's
        import studio.library.catalog as catalog_module

        paths = sorted(e.path for e in catalog.all())
        batched = catalog_module.analyse_files(paths)
        monkeypatch.setattr(catalog_module, "SCAN_BATCH_BYTES", 1)
        for one, many in zip(catalog_module.analyse_files(paths), batched):
            assert one[6][:4] == many[6][:4]
            assert np.allclose(np.frombuffer(one[6][4], np.float16), np.frombuffer(many[6][4], np.float16), atol=2e-3)
            assert np.allclose(np.frombuffer(one[6][5], np.float16), np.frombuffer(many[6][5], np.float16), atol=1e-3)

        xl = catalog.get("xl")
        small_kohya_file(library / "xl.safetensors", seed=9)   # new content: new features in the same row
        catalog.scan(library)
        assert catalog.get("xl").id == xl.id
        assert catalog.feature_ids(fp)[xl.id] == catalog.get("xl").tensor_hash != xl.tensor_hash
        assert len(catalog.stored_features([xl.id], fp)[xl.id].names) == catalog.get("xl").n_modules

        (library / "xl.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")   # quarantined
        catalog.scan(library)
        assert xl.id not in catalog.feature_ids(fp)
        (library / "sd15_diffusers.safetensors").unlink()   # gone
        sd15 = catalog.get("sd15_diffusers").id
        catalog.scan(library)
        assert sd15 not in catalog.feature_ids(fp)
    check_consistent(db_path)
    with Catalog(tmp_path / "bare.db", features=None) as catalog:   # no hook: no features
        catalog.scan(library)
        assert catalog.all() and catalog.feature_ids(fp) == {}


def test_features_of_an_older_descriptor_are_refreshed_by_the_next_scan_once(tmp_path, library):
    """After an upgrade that changes what the features hook stores (its fingerprint), the next scan reads those
    files again and stores the new features (the index then reads no file); the scan after that reads none."""
    from retrieval.descriptor import DescriptorConfig, blocks_fingerprint

    fp = blocks_fingerprint(DescriptorConfig())
    with Catalog(tmp_path / "catalog.db") as catalog:
        catalog.scan(library)
        ids = catalog.feature_ids(fp)
        catalog._db.execute("UPDATE features SET fingerprint = 'blocks:an-older-version'")   # as an old release left it
        assert catalog.feature_ids(fp) == {}
        report = catalog.scan(library)
        assert catalog.feature_ids(fp) == ids and not report.added and not report.updated
        assert catalog._stale_features() == set()
    with Catalog(tmp_path / "bare.db", features=None) as catalog:   # no hook: nothing is ever stale
        catalog.scan(library)
        assert catalog._stale_features() == set()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_catalog_opens_and_is_migrated(tmp_path, library, version):
    """A catalog written before features existed (schema 1: no features tables), before text vectors (schema 2) or
    before init prints (schema 3) opens as it is: the tables and column are added, its rows have no features (no
    init prints) until their files change or are read again; a newer schema is refused."""
    from retrieval.descriptor import DescriptorConfig, blocks_fingerprint

    fp = blocks_fingerprint(DescriptorConfig())
    db_path = tmp_path / "catalog.db"
    with Catalog(db_path, features=None if version == 1 else DEFAULT_FEATURES) as catalog:
        catalog.scan(library)
        before = {e.id: (e.path, e.status, e.tensor_hash) for e in catalog.all() + catalog.quarantined()}
    with sqlite3.connect(db_path) as db:   # what that schema's code wrote: the same loras table
        db.execute("ALTER TABLE features DROP COLUMN init_print")
        if version < 3:
            db.execute("DROP TABLE text_vectors")
        if version == 1:
            db.execute("DROP TABLE features")
            db.execute("DROP TABLE feature_layouts")
        db.execute("UPDATE schema_version SET version = ?", (version,))
    with Catalog(db_path) as catalog:
        assert {e.id: (e.path, e.status, e.tensor_hash) for e in catalog.all() + catalog.quarantined()} == before
        assert catalog.text_vectors(list(before), "any") == {}
        if version == 1:
            assert catalog.feature_ids(fp) == {}
        else:
            assert all(f.init_print is None for f in catalog.stored_features(list(before), fp).values())
        assert catalog.scan(library).unchanged == 7   # nothing re-read
        zqx = library / "styles" / "zqx.safetensors"
        os.utime(zqx, ns=(time.time_ns(), time.time_ns() + 10**9))   # touched: read again, same content
        catalog.scan(library)
        assert set(catalog.feature_ids(fp)) == ({catalog.get("zqx").id} if version == 1 else set(before) - {
            e.id for e in catalog.quarantined()})
    check_consistent(db_path)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Catalog(db_path)
