"""The LoRA catalog: an SQLite index of LoRA files, scanned incrementally and crash-safe.

Each file is indexed in its own transaction, so a scan killed at any moment leaves a consistent catalog and
the next scan carries on. Files are recognised by (size, mtime, sidecar stamps), then by content hash; bad
files are recorded as quarantined with the reason and fix; files with the same tensor bytes are duplicates
of the first one indexed.

A scan also stores, per readable file, what a features hook computes from the LoRA it has just loaded (by
default the retrieval weight descriptor's raw blocks and the LoRA's initialisation fingerprint,
`retrieval.catalog_features`), in the ``features`` table, written and deleted in the file's own transaction;
`LibraryIndex` then needs no second read of the file. Schema 2 added that table; a schema-1 catalog gains it when
opened (its rows have no features). Schema 4 added its ``init_print`` column (older rows have none).

Big scans, whose files are read in worker processes, also store each readable file's metadata-text vector from the
packaged sentence model (`retrieval.text.catalog_text_vectors`, in the ``text_vectors`` table, written and deleted
like its features): the workers embed the texts beside reading the files, and the index does not embed them again.
Schema 3 added that table; older catalogs gain it when opened (their rows have no text vectors).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..gc_pause import rare_collections
from . import sidecars as sc
from .canonical import LoRA
from .errors import LoRAFileError
from .formats import PICKLE_SUFFIXES, read_lora

_REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


def cache_dir(library: str | Path) -> Path:
    """Where LoRA Studio keeps a library's derived files (catalog, vector index, previews, frequency scores,
    style map): ``<library>/.studio``, except for the libraries shipped in the repository's ``assets/``
    (TinyWorld's), whose caches go to ``runs/cache/<path under assets>``: the committed assets stay as shipped."""
    library = Path(library).resolve()
    assets = _REPO / "assets"
    if library.is_relative_to(assets):
        return _REPO / "runs" / "cache" / library.relative_to(assets)
    return library / ".studio"


SCHEMA_VERSION = 4   # 2: the features and feature_layouts tables; 3: text_vectors; 4: features.init_print
# (older catalogs: migrated on open)
LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS loras (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    alias TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'duplicate', 'quarantined')),
    duplicate_of INTEGER,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sidecar_stamp TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    tensor_hash TEXT,
    format TEXT,
    kinds TEXT,
    dora INTEGER,
    family TEXT,
    ranks TEXT,
    alphas TEXT,
    n_modules INTEGER,
    components TEXT,
    trigger_words TEXT NOT NULL,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,
    preview TEXT,
    sidecar TEXT NOT NULL,
    metadata TEXT NOT NULL,
    warnings TEXT NOT NULL,
    reason TEXT,
    fix TEXT,
    indexed_at REAL NOT NULL,
    CHECK (status = 'quarantined' AND reason IS NOT NULL AND fix IS NOT NULL AND tensor_hash IS NULL
           OR status != 'quarantined' AND tensor_hash IS NOT NULL AND format IS NOT NULL AND family IS NOT NULL
              AND n_modules > 0 AND (status = 'ok') = (duplicate_of IS NULL))
);
CREATE INDEX IF NOT EXISTS loras_tensor_hash ON loras (tensor_hash);
CREATE INDEX IF NOT EXISTS loras_name ON loras (name);
CREATE TABLE IF NOT EXISTS feature_layouts (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    names TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS features (
    lora_id INTEGER PRIMARY KEY,
    tensor_hash TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    layout INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    blocks BLOB NOT NULL,
    init_print BLOB
);
CREATE INDEX IF NOT EXISTS features_fingerprint ON features (fingerprint, tensor_hash);
CREATE TABLE IF NOT EXISTS text_vectors (
    lora_id INTEGER PRIMARY KEY,
    embedder TEXT NOT NULL,
    text_key TEXT NOT NULL,
    vector BLOB NOT NULL
);
"""
_JSON_COLUMNS = ("kinds", "ranks", "alphas", "components", "trigger_words", "tags", "sidecar", "metadata", "warnings")


@dataclass
class Entry:
    """One catalogued file (an indexed LoRA, a duplicate of one, or a quarantined file)."""

    id: int
    path: Path
    name: str
    alias: str | None
    status: str
    duplicate_of: int | None
    size: int
    file_sha256: str
    tensor_hash: str | None
    format: str | None
    kinds: list[str]
    dora: bool
    family: str | None
    ranks: list[int]
    alphas: list[float]
    n_modules: int | None
    components: dict[str, int]
    trigger_words: list[str]
    description: str
    tags: list[str]
    preview: Path | None
    sidecar: dict
    metadata: dict[str, str]
    warnings: list[str]
    reason: str | None
    fix: str | None

    def one_line(self) -> str:
        if self.status == "quarantined":
            return f"{self.path.name}: {self.reason} (fix: {self.fix})"
        ranks = "/".join(map(str, self.ranks))
        return f"{self.name} [{self.family}, {','.join(self.kinds)} r{ranks}, {self.n_modules} modules]"


@dataclass
class ScanReport:
    """What one scan did; `str()` is a summary plus one line per quarantined or duplicate file."""

    root: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"scanned {self.root} in {self.seconds:.1f}s: {len(self.added)} added, {len(self.updated)} updated, "
            f"{self.unchanged} unchanged, {len(self.removed)} removed, {len(self.duplicates)} duplicates, "
            f"{len(self.quarantined)} quarantined"
        ]
        lines += [f"  quarantined {line}" for line in self.quarantined]
        lines += [f"  duplicate   {line}" for line in self.duplicates]
        return "\n".join(lines)


def file_hashes(path: str | Path) -> tuple[str, str | None]:
    """(sha256 of the whole file, sha256 of the bytes after the safetensors header or None if it has none).

    The second is kohya's ``sshs_model_hash``: it ignores the metadata, so re-tagged copies still match.
    """
    full, tensors = hashlib.sha256(), hashlib.sha256()
    start, offset = None, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if start is None:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(chunk[:8], "little") if len(chunk) >= 8 else size
                start = 8 + n if 8 + n <= size else -1
            full.update(chunk)
            if start >= 0 and offset + len(chunk) > start:
                tensors.update(chunk[max(0, start - offset) :])
            offset += len(chunk)
    return full.hexdigest(), tensors.hexdigest() if start is not None and start >= 0 else None


def _stamp(files: list[Path]) -> str:
    stamps = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        stamps.append([f.name, st.st_size, st.st_mtime_ns])
    return json.dumps(stamps)


def describe_file(path: Path, side: sc.Sidecars, sha: str, tensor_hash: str | None) -> dict:
    """Column values for one file: parsed and checked LoRA facts, or the reason it is quarantined."""
    return _describe(path, side, sha, tensor_hash)[0]


def _describe(path: Path, side: sc.Sidecars, sha: str, tensor_hash: str | None) -> tuple[dict, LoRA | None]:
    """`describe_file`, and the LoRA it read (None for a quarantined file)."""
    record = {
        "alias": None, "tensor_hash": None, "format": None, "kinds": [], "dora": None, "family": None,
        "ranks": [], "alphas": [], "n_modules": None, "components": {}, "trigger_words": [], "description": "",
        "tags": [], "preview": str(side.preview) if side.preview else None, "sidecar": side.as_dict(),
        "metadata": {}, "warnings": list(side.warnings), "reason": None, "fix": None,
    }
    lora = None
    try:
        lora = read_lora(path)
    except LoRAFileError as e:
        record.update(reason=e.reason, fix=e.fix)
    except OSError as e:
        record.update(reason=f"cannot read the file ({e.strerror or e})", fix="check the file and its permissions")
    except Exception as e:  # a scan never stops on one file
        record.update(reason=f"unexpected {type(e).__name__}: {e}", fix="report this file as a LoRA Studio bug")
    else:
        family = lora.family
        hint = sc.family_hint(side)
        if family == "unknown" and hint:
            family = hint
        elif hint and hint != family:
            record["warnings"].append(f"sidecar files say {hint} but the tensors say {family}")
        record.update(
            alias=sc.alias(lora.metadata, side), tensor_hash=tensor_hash or sha, format=lora.source_format,
            kinds=lora.kinds(), dora=lora.has_dora, family=family, ranks=lora.ranks(), alphas=lora.alphas(),
            n_modules=len(lora.modules), components=lora.components(),
            trigger_words=sc.trigger_words(lora.metadata, side), description=sc.description(lora.metadata, side),
            tags=sc.tags(lora.metadata, side), metadata=lora.metadata,
        )
    for column in _JSON_COLUMNS:
        record[column] = json.dumps(record[column])
    return record, lora


POOL_MIN_FILES = 64   # below this many new or changed files a scan reads them in-process
SCAN_BATCH = 64       # files a scan worker reads before it computes their features and text vectors together
#                       (batched SVDs and sentence-model batches: 10 000 files 6 % faster than 16 at a time) ...
SCAN_BATCH_BYTES = 64 << 20   # ... or fewer, once they hold this many bytes (each LoRA holds its file's bytes)

# What a scan stores per readable file besides its columns: "module:function", called in the process that read
# the file with a list of LoRAs, returning per LoRA (fingerprint, names, blocks (len(names), n) float array[,
# init fingerprint float16 vector]) or None. A string, so the catalog does not import retrieval (it is imported
# where the hook first runs).
DEFAULT_FEATURES = "retrieval.catalog_features:catalog_features"
# What a scan's worker processes store per readable file besides: "module:function", called with a list of
# {name, alias, trigger_words, description, tags} dicts, returning per item (embedder fingerprint, text key,
# float32 vector) or None.
DEFAULT_TEXT_VECTORS = "retrieval.text:catalog_text_vectors"
TEXT_MIN_FILES = 1024   # below this many files read by workers, none is embedded (each worker loads the model: seconds)


@functools.lru_cache(maxsize=8)
def _features_hook(spec: str) -> Callable | None:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        log.warning("catalog hook %s unavailable (%s): nothing stored by it", spec, e)
        return None


@dataclass
class StoredFeatures:
    """One LoRA's features as a scan stored them: names (one per row of `blocks`), the blocks and the LoRA's
    initialisation fingerprint (None when the hook gave none)."""

    tensor_hash: str
    fingerprint: str
    names: list[str]
    blocks: np.ndarray
    init_print: np.ndarray | None = None


def _features_of(loras: list[LoRA], spec: str | None) -> list[tuple | None]:
    """Features of each LoRA as rows for the catalog: (fingerprint, names JSON, its digest, dtype, blob, init print
    float16 blob or None) or None."""
    hook = _features_hook(spec) if spec else None
    if hook is None or not loras:
        return [None] * len(loras)
    try:
        found = hook(loras)
    except Exception:   # one odd LoRA must not cost the others their features: one at a time
        found = []
        for lora in loras:
            try:
                found += hook([lora])
            except Exception as e:
                log.warning("features hook failed on a LoRA (%s: %s); the index will read its file",
                            type(e).__name__, e)
                found.append(None)
    out = []
    for item in found:
        if item is None:
            out.append(None)
            continue
        fingerprint, names, blocks, *rest = item
        blocks = np.ascontiguousarray(blocks)
        names_json = json.dumps(list(names))
        digest = hashlib.sha256(names_json.encode()).hexdigest()[:32]
        init = np.asarray(rest[0], dtype=np.float16).tobytes() if rest and rest[0] is not None else None
        out.append((fingerprint, names_json, digest, blocks.dtype.str, blocks.tobytes(), init))
    return out


def _text_vectors_of(items: list[dict], spec: str | None) -> list[tuple | None]:
    """Text vectors of readable files' metadata as rows for the catalog: (embedder, text key, float32 blob) or None."""
    hook = _features_hook(spec) if spec else None
    if hook is None or not items:
        return [None] * len(items)
    try:
        found = hook(items)
    except Exception as e:   # no vectors stored: the index embeds these texts itself
        log.warning("text vectors hook failed (%s: %s); the index will embed these texts", type(e).__name__, e)
        return [None] * len(items)
    return [None if v is None else (v[0], v[1], np.asarray(v[2], dtype=np.float32).tobytes()) for v in found]


def _metadata_of(path: Path, record: dict) -> dict:
    """What retrieval's metadata text is made of, from a readable file's column values."""
    return {"name": path.stem, "alias": record["alias"], "trigger_words": json.loads(record["trigger_words"]),
            "description": record["description"], "tags": json.loads(record["tags"])}


def analyse_files(paths: Sequence[str | Path], features: str | None = DEFAULT_FEATURES,
                  text_vectors: str | None = None) -> list[tuple | None]:
    """The per-file work of a scan, free of the database, per path: (size, mtime_ns, sidecar stamp, sha256, tensor
    hash, column values, features row or None, text vector row or None), or None if the file vanished. Runs in
    worker processes on big scans; the features (and text vectors) of the files read are computed together."""
    out, read, held = [], [], 0

    def featurise():
        for item, row in zip(read, _features_of([lora for _, lora, _ in read], features)):
            item[0][6] = row
        for item, row in zip(read, _text_vectors_of([meta for _, _, meta in read], text_vectors)):
            item[0][7] = row
        read.clear()

    for path in map(Path, paths):
        try:
            st = path.stat()
            side = sc.find_sidecars(path)
            stamp = _stamp(side.files)
            sha, tensor_hash = file_hashes(path)
            record, lora = _describe(path, side, sha, tensor_hash)
        except FileNotFoundError:
            out.append(None)
            continue
        out.append([st.st_size, st.st_mtime_ns, stamp, sha, tensor_hash, record, None, None])
        if lora is not None:
            read.append((out[-1], lora, _metadata_of(path, record) if text_vectors else None))
            held += st.st_size
            if held >= SCAN_BATCH_BYTES:
                featurise()
                held = 0
    featurise()
    return [tuple(a) if a is not None else None for a in out]


def analyse_file(path: str | Path, features: str | None = DEFAULT_FEATURES,
                 text_vectors: str | None = None) -> tuple | None:
    """`analyse_files` of one file."""
    return analyse_files([path], features, text_vectors)[0]


def exit_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: the worker exits when the process that started it is gone (a server killed with
    SIGKILL mid-scan must not leave orphaned workers behind)."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _init_scan_worker(parent_pid: int) -> None:
    import torch

    from studio.gc_pause import bulk_gc_thresholds

    torch.set_num_threads(1)
    exit_with_parent(parent_pid)
    bulk_gc_thresholds()


def scan_batches(paths: list[Path], workers: int) -> list[list[Path]]:
    """The files in consecutive batches of `SCAN_BATCH`, smaller when there are few: at least 4 per worker."""
    size = max(1, min(SCAN_BATCH, -(-len(paths) // (4 * max(1, workers)))))
    return [paths[i:i + size] for i in range(0, len(paths), size)]


def _analysed(paths: list[Path], workers: int, features: str | None = DEFAULT_FEATURES,
              text_vectors: str | None = DEFAULT_TEXT_VECTORS):
    """analyse_files over `paths`, in order, one analysis per path: a process pool of `workers` when there are
    enough files (each file's database write stays in the scanning process, one transaction each, so a kill still
    leaves a consistent catalog). Text vectors are computed by pool workers only, and from TEXT_MIN_FILES files."""
    batches = scan_batches(paths, workers)
    analyse = functools.partial(analyse_files, features=features)
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        for batch in batches:
            yield from analyse(batch)
        return
    pooled = functools.partial(analyse_files, features=features,
                               text_vectors=text_vectors if len(paths) >= TEXT_MIN_FILES else None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_scan_worker, initargs=(os.getpid(),))
    done = 0
    try:
        for analyses in pool.map(pooled, batches):
            yield from analyses
            done += 1
    except BrokenProcessPool:   # e.g. a script without `if __name__ == "__main__":` (spawned workers re-run it)
        import warnings

        warnings.warn("LoRA scan: worker processes failed to start; reading the files in this process instead "
                      "(run scans from a `if __name__ == '__main__':` block to use several cores)", RuntimeWarning)
        for batch in batches[done:]:
            yield from analyse(batch)
    finally:   # also when the scan stops early: no worker outlives it
        pool.shutdown(wait=True, cancel_futures=True)


class Catalog:
    """SQLite catalog of LoRA files (WAL journal, one transaction per file)."""

    def __init__(self, db_path: str | Path, features: str | None = DEFAULT_FEATURES,
                 text_vectors: str | None = DEFAULT_TEXT_VECTORS):
        """`features`, `text_vectors`: the hooks whose output scans store per file ("module:function", see
        `DEFAULT_FEATURES` and `DEFAULT_TEXT_VECTORS`; None stores none)."""
        self.db_path = Path(db_path)
        self.features_hook = features
        self.text_vectors_hook = text_vectors
        self._layout_names: dict[int, list[str]] = {}   # feature_layouts rows are never changed nor deleted
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.db_path, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)   # IF NOT EXISTS: on an older catalog, adds the newer tables
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] in (1, 2, 3):   # migrated in place: rows without features, text vectors or init prints
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(features)")}
                if "init_print" not in columns:
                    self._db.execute("ALTER TABLE features ADD COLUMN init_print BLOB")
                self._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.db_path}: catalog schema version {row[0]}, this LoRA Studio uses {SCHEMA_VERSION}; "
                    "delete the file and scan again to rebuild it"
                )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- scanning ------------------------------------------------------------------------------------------

    def scan(self, directory: str | Path, workers: int = 1) -> ScanReport:
        """Index every LoRA file under `directory`; forget catalogued files there that are gone. With
        `workers` > 1, new and changed files are read by that many processes when there are many of them
        (spawned: the calling script needs a `if __name__ == "__main__":` guard; `studio index` uses one per core)."""
        started = time.monotonic()
        root = Path(directory).resolve()
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder (nothing scanned, nothing forgotten)")
        report = ScanReport(root=str(root))
        files = sorted(
            p for p in root.rglob("*")
            if p.suffix.lower() in LORA_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        present = {str(p) for p in files}
        known = {r["path"]: r for r in self._db.execute("SELECT * FROM loras")}
        for path, row in known.items():
            if Path(path).is_relative_to(root) and path not in present:
                with self._transaction():
                    self._db.execute("DELETE FROM loras WHERE id = ?", (row["id"],))
                    self._db.execute("DELETE FROM features WHERE lora_id = ?", (row["id"],))
                    self._db.execute("DELETE FROM text_vectors WHERE lora_id = ?", (row["id"],))
                    self._repair_duplicates(row["tensor_hash"])
                report.removed.append(path)
        changed = []
        stale = self._stale_features()
        for path in files:
            try:
                if str(path) not in stale and self._unchanged(path, known.get(str(path))):
                    report.unchanged += 1
                else:
                    changed.append(path)
            except FileNotFoundError:
                continue  # deleted while scanning; the next scan forgets it
        results = _analysed(changed, workers, self.features_hook, self.text_vectors_hook)
        try:
            with rare_collections():
                for path, analysis in zip(changed, results):
                    if analysis is not None:
                        self._scan_file(path, known.get(str(path)), report, analysis)
        finally:
            results.close()
        report.seconds = time.monotonic() - started
        return report

    def _stale_features(self) -> set[str]:
        """Paths of files whose stored features were made by another version of the features hook (its
        ``fingerprint()``, when it has one): a scan reads them again once, so that indexing does not read them
        every time after an upgrade."""
        hook = _features_hook(self.features_hook) if self.features_hook else None
        current = getattr(hook, "fingerprint", None)
        if current is None:
            return set()
        rows = self._db.execute("SELECT loras.path FROM loras JOIN features ON features.lora_id = loras.id "
                                "WHERE features.fingerprint != ?", (current(),))
        return {r[0] for r in rows}

    @staticmethod
    def _unchanged(path: Path, row: sqlite3.Row | None) -> bool:
        if row is None:
            return False
        st = path.stat()
        stamp = _stamp(sc.find_sidecars(path).files)
        return (row["size"], row["mtime_ns"], row["sidecar_stamp"]) == (st.st_size, st.st_mtime_ns, stamp)

    def _scan_file(self, path: Path, row: sqlite3.Row | None, report: ScanReport, analysis: tuple) -> None:
        size, mtime_ns, stamp, sha, tensor_hash, record, features, text_vector = analysis
        if row and row["file_sha256"] == sha and row["sidecar_stamp"] == stamp:
            with self._transaction():
                self._db.execute("UPDATE loras SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, row["id"]))
                if features is not None:   # read anyway: kept (a catalog from before features lacks them)
                    self._store_features(row["id"], row["tensor_hash"], features)
                if text_vector is not None:
                    self._store_text_vector(row["id"], text_vector)
            report.unchanged += 1
            return
        record = dict(record)
        record.update(
            path=str(path), name=path.stem, status="quarantined" if record["reason"] else "ok", duplicate_of=None,
            size=size, mtime_ns=mtime_ns, sidecar_stamp=stamp, file_sha256=sha, indexed_at=time.time(),
        )
        columns = ", ".join(record)
        updates = ", ".join(f"{c} = excluded.{c}" for c in record if c != "path")
        with self._transaction():
            self._db.execute(
                f"INSERT INTO loras ({columns}) VALUES ({', '.join('?' * len(record))}) "
                f"ON CONFLICT (path) DO UPDATE SET {updates}",
                tuple(record.values()),
            )
            if row is not None:
                self._repair_duplicates(row["tensor_hash"])
            self._repair_duplicates(record["tensor_hash"])
            new = self._db.execute("SELECT id, status, duplicate_of FROM loras WHERE path = ?", (str(path),)).fetchone()
            self._store_features(new["id"], record["tensor_hash"], features)
            self._store_text_vector(new["id"], text_vector)
        (report.updated if row else report.added).append(str(path))
        if new["status"] == "quarantined":
            report.quarantined.append(f"{path.name}: {record['reason']} (fix: {record['fix']})")
        elif new["status"] == "duplicate":
            original = self._db.execute("SELECT path FROM loras WHERE id = ?", (new["duplicate_of"],)).fetchone()
            report.duplicates.append(f"{path.name} has the same tensors as {Path(original['path']).name}")

    def _store_features(self, lora_id: int, tensor_hash: str | None, features: tuple | None) -> None:
        """Replace a row's stored features (inside the row's transaction)."""
        self._db.execute("DELETE FROM features WHERE lora_id = ?", (lora_id,))
        if features is None or tensor_hash is None:
            return
        fingerprint, names_json, digest, dtype, blob, init = features
        self._db.execute("INSERT OR IGNORE INTO feature_layouts (digest, names) VALUES (?, ?)", (digest, names_json))
        layout = self._db.execute("SELECT id FROM feature_layouts WHERE digest = ?", (digest,)).fetchone()[0]
        self._db.execute(
            "INSERT INTO features (lora_id, tensor_hash, fingerprint, layout, dtype, blocks, init_print) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (lora_id, tensor_hash, fingerprint, layout, dtype, blob, init),
        )

    def _store_text_vector(self, lora_id: int, text_vector: tuple | None) -> None:
        """Replace a row's stored metadata-text vector (inside the row's transaction)."""
        self._db.execute("DELETE FROM text_vectors WHERE lora_id = ?", (lora_id,))
        if text_vector is not None:
            self._db.execute("INSERT INTO text_vectors (lora_id, embedder, text_key, vector) VALUES (?, ?, ?, ?)",
                             (lora_id, *text_vector))

    def _repair_duplicates(self, tensor_hash: str | None) -> None:
        """Make the lowest id with this tensor hash the original and the others its duplicates."""
        if tensor_hash is None:
            return
        ids = [r[0] for r in self._db.execute(
            "SELECT id FROM loras WHERE tensor_hash = ? AND status != 'quarantined' ORDER BY id", (tensor_hash,)
        )]
        if ids:
            self._db.execute("UPDATE loras SET status = 'ok', duplicate_of = NULL WHERE id = ?", (ids[0],))
            self._db.executemany(
                "UPDATE loras SET status = 'duplicate', duplicate_of = ? WHERE id = ?", [(ids[0], i) for i in ids[1:]]
            )

    # -- queries -------------------------------------------------------------------------------------------

    def _entries(self, where: str, params=()) -> list[Entry]:
        rows = self._db.execute(f"SELECT * FROM loras WHERE {where} ORDER BY name, id", params).fetchall()
        return [_entry(r) for r in rows]

    def all(self) -> list[Entry]:
        """Indexed LoRAs (originals and duplicates), by name."""
        return self._entries("status != 'quarantined'")

    def quarantined(self) -> list[Entry]:
        return self._entries("status = 'quarantined'")

    def get(self, name_or_id: int | str) -> Entry:
        """An indexed LoRA by id, path, file name (stem), alias or case-insensitive name; KeyError if none."""
        if isinstance(name_or_id, int):
            found = self._entries("id = ?", (name_or_id,))
        else:
            key = str(name_or_id)
            found = (
                self._entries("path = ?", (str(Path(key).resolve()),))
                or self._entries("name = ? OR alias = ?", (key, key))
                or self._entries("lower(name) = lower(?) OR lower(alias) = lower(?)", (key, key))
                or (self._entries("id = ?", (int(key),)) if key.isdigit() else [])
            )
        ok = [e for e in found if e.status != "quarantined"]
        if ok:
            return min(ok, key=lambda e: (e.status != "ok", e.id))
        if found:
            bad = found[0]
            raise KeyError(f"{name_or_id!r} is quarantined: {bad.reason} (fix: {bad.fix})")
        names = [r[0] for r in self._db.execute("SELECT name FROM loras WHERE status != 'quarantined'")]
        close = difflib.get_close_matches(str(name_or_id), names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"no LoRA {name_or_id!r} in the catalog{hint}")

    def load(self, name_or_id: int | str) -> LoRA:
        """Read the catalogued file into a canonical `LoRA`."""
        return read_lora(self.get(name_or_id).path)

    # -- stored features -----------------------------------------------------------------------------------

    def feature_ids(self, fingerprint: str) -> dict[int, str]:
        """{id: tensor hash} of the LoRAs whose stored features were made with `fingerprint`."""
        return dict(self._db.execute("SELECT lora_id, tensor_hash FROM features WHERE fingerprint = ?", (fingerprint,)))

    def stored_features(self, ids: Sequence[int], fingerprint: str) -> dict[int, StoredFeatures]:
        """Stored features of these LoRAs made with `fingerprint` (those without any are left out)."""
        out: dict[int, StoredFeatures] = {}
        layouts = self._layout_names
        ids = list(ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self._db.execute(
                f"SELECT lora_id, tensor_hash, layout, dtype, blocks, init_print FROM features "
                f"WHERE fingerprint = ? AND lora_id IN ({', '.join('?' * len(chunk))})", (fingerprint, *chunk),
            ).fetchall()
            for lora_id, tensor_hash, layout, dtype, blob, init in rows:
                names = layouts.get(layout)
                if names is None:
                    found = self._db.execute("SELECT names FROM feature_layouts WHERE id = ?", (layout,)).fetchone()
                    if found is None:
                        continue
                    names = layouts[layout] = json.loads(found[0])
                blocks = np.frombuffer(blob, dtype=np.dtype(dtype))
                if not names or blocks.size % len(names):
                    continue
                init = np.frombuffer(init, dtype=np.float16) if init is not None else None
                out[lora_id] = StoredFeatures(tensor_hash, fingerprint, names, blocks.reshape(len(names), -1), init)
        return out


    def text_vectors(self, ids: Sequence[int], embedder: str) -> dict[int, tuple[str, np.ndarray]]:
        """{id: (text key, float32 vector)}: the metadata-text vectors a scan stored for these LoRAs with the
        embedder whose fingerprint is `embedder` (those without any are left out)."""
        out: dict[int, tuple[str, np.ndarray]] = {}
        ids = list(ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self._db.execute(
                f"SELECT lora_id, text_key, vector FROM text_vectors "
                f"WHERE embedder = ? AND lora_id IN ({', '.join('?' * len(chunk))})", (embedder, *chunk),
            )
            for lora_id, key, blob in rows:
                out[lora_id] = key, np.frombuffer(blob, dtype=np.float32)
        return out


def _entry(row: sqlite3.Row) -> Entry:
    values = {k: row[k] for k in row.keys()}
    for column in _JSON_COLUMNS:
        values[column] = json.loads(values[column])
    values["path"] = Path(values["path"])
    values["preview"] = Path(values["preview"]) if values["preview"] else None
    values["dora"] = bool(values["dora"])
    for column in ("mtime_ns", "sidecar_stamp", "indexed_at"):
        del values[column]
    return Entry(**values)
