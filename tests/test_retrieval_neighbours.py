"""Weights-only retrieval by neighbour transfer: LoRAs without metadata get a text-space vector from the metadata
of the LoRAs nearest in weights, with what one initialisation shares taken out."""
import json
import shutil

import numpy as np
import torch

from retrieval.descriptor import DescriptorConfig, lora_svds_many, raw_blocks_many, stored_blocks
from retrieval.autopick import reason
from retrieval.library import LibraryIndex
from retrieval.neighbours import ContentRows, attention_factors, content_space, neighbour_vectors
from retrieval.shared_init import INIT_DIM, init_fingerprints
from retrieval.synthetic import SMALL_TARGETS, synthetic_lora, write_synthetic_library
from retrieval.text import HashingEmbedder
from studio.library.canonical import LoRA, ModuleLoRA
from studio.library.catalog import Catalog
from studio.library.formats import write_lora


def batch_runs(n_runs=4, n_concepts=5, seed=0):
    """`n_runs` trainer runs from one initialisation each (one rank-3 down matrix per module) with a strong
    run-specific output direction, each training one LoRA of every concept (a concept: two fixed output
    directions)."""
    g = torch.Generator().manual_seed(seed)
    concept_dirs = [{m: torch.randn(o, 2, generator=g) for m, (o, i) in SMALL_TARGETS.items()}
                    for _ in range(n_concepts)]
    loras, concept, run = [], [], []
    for r in range(n_runs):
        A = {m: torch.linalg.qr(torch.randn(i, 3, generator=g))[0].T for m, (o, i) in SMALL_TARGETS.items()}
        bias = {m: 8.0 * torch.randn(o, 1, generator=g) for m, (o, i) in SMALL_TARGETS.items()}
        for c in range(n_concepts):
            mods = {m: ModuleLoRA("lora", {"down": A[m], "up": torch.cat([concept_dirs[c][m], bias[m]], 1)
                                  + 0.1 * torch.randn(o, 3, generator=g)}, alpha=3.0)
                    for m, (o, i) in SMALL_TARGETS.items()}
            loras.append(LoRA(mods, family="tinyworld"))
            concept.append(c)
            run.append(r)
    return loras, np.array(concept), np.array(run)


def test_bare_loras_get_their_concepts_text_from_other_runs():
    loras, concept, run = batch_runs()
    cfg = DescriptorConfig()
    blocks = [stored_blocks(b, cfg) for b in raw_blocks_many(lora_svds_many(loras, cfg.top_k), cfg)]
    rows = ContentRows([attention_factors(names, b, cfg) for names, b in blocks], cfg)
    prints = init_fingerprints(loras)
    assert prints.shape == (len(loras), INIT_DIM)
    texts = np.eye(concept.max() + 1, dtype=np.float32)           # one text vector per concept
    sources = run < 3                                              # runs 0-2 have metadata; run 3 is bare
    X = content_space(rows, prints)
    V, has, used = neighbour_vectors(X, sources, texts[concept[sources]])
    assert has.all()
    assert (V.argmax(1) == concept).all()                          # bare LoRAs included
    assert all(sources[u].all() and concept[u[0]] == c and i not in u for i, (u, c) in enumerate(zip(used, concept)))
    # without taking the shared initialisation out, a LoRA's nearest LoRA is one of its own run, not its concept
    def nearest(X):
        S = X @ X.T
        np.fill_diagonal(S, -np.inf)
        return S.argmax(1)

    alone = np.eye(len(loras), INIT_DIM, dtype=np.float32)          # fingerprints that link nothing
    assert (run[nearest(content_space(rows, alone))] == run).mean() > 0.9
    assert (concept[nearest(X)] == concept).all()


def test_content_space_built_in_chunks_equals_the_explicit_one():
    """At 10 000 LoRAs the content rows are never explicit: the randomised PCA over rows built chunk by chunk
    (centring applied through the operator and its transpose) gives the space the explicit PCA gives."""
    loras, concept, run = batch_runs(n_runs=5, n_concepts=6)
    cfg = DescriptorConfig()
    blocks = [stored_blocks(b, cfg) for b in raw_blocks_many(lora_svds_many(loras, cfg.top_k), cfg)]
    rows = ContentRows([attention_factors(names, b, cfg) for names, b in blocks], cfg)
    prints = init_fingerprints(loras)
    explicit = content_space(rows, prints, dim=8)
    chunked = content_space(rows, prints, dim=8, chunk=7, explicit_floats=0)
    assert np.abs(explicit @ explicit.T - chunked @ chunked.T).max() < 1e-3
    fitted_on_half = content_space(rows, prints, dim=8, fit_rows=15, explicit_floats=0)
    assert fitted_on_half.shape == explicit.shape and np.isfinite(fitted_on_half).all()


def test_content_rows_projected_on_threads_equal_the_rows_times_the_matrix():
    """`ContentRows.projected` shares spans out over threads, each with its own buffers: the same numbers as one
    thread and as the explicit rows times the matrix, in the spans' order."""
    loras, _, _ = batch_runs(n_runs=3, n_concepts=5)
    cfg = DescriptorConfig()
    blocks = [stored_blocks(b, cfg) for b in raw_blocks_many(lora_svds_many(loras, cfg.top_k), cfg)]
    rows = ContentRows([attention_factors(names, b, cfg) for names, b in blocks], cfg)
    M = np.random.default_rng(0).standard_normal((rows.dim, 6)).astype(np.float32)
    spans = [range(0, 4), range(4, 11), range(11, 15)]
    explicit = rows.rows(range(len(rows))) @ M
    one = rows.projected(spans, M, threads=1)
    several = rows.projected(spans, M, threads=3)
    assert np.allclose(one, explicit, atol=1e-5) and np.allclose(several, explicit, atol=1e-5)
    assert rows.projected([], M).shape == (0, 6)


def test_content_rows_of_a_large_layout_keep_an_even_spread_of_modules():
    """SDXL-sized layouts (hundreds of attention modules) use at most `max_modules` of them, the same ones for every
    LoRA, spread over the sorted layout; a LoRA with none of them gets a zero row."""
    cfg = DescriptorConfig()
    rng = np.random.default_rng(0)
    names = [f"unet.block{i:03d}.attn1.to_q" for i in range(40)]
    items = [(names, rng.standard_normal((40, cfg.content_width)).astype(np.float16)),
             (names[::2], rng.standard_normal((20, cfg.content_width)).astype(np.float16)),
             (names[1:2], rng.standard_normal((1, cfg.content_width)).astype(np.float16))]
    rows = ContentRows(items, cfg, max_modules=10)
    assert len(rows.names) == 10 and rows.names[0] == names[0] and rows.names[-1] == names[-1]
    X = rows.rows(range(3))
    assert X.shape == (3, 10 * rows.w) and np.allclose(np.linalg.norm(X[:2], axis=1), 1.0, atol=1e-4)
    assert not X[2].any()                                          # its only module is not in the layout
    full = ContentRows(items[:1], cfg, max_modules=10).rows([0])
    assert np.allclose(full, X[:1], atol=1e-5)                     # same union of names, same chosen modules


def test_the_content_factor_keeps_the_output_gram_and_ignores_svd_signs():
    from retrieval.descriptor import ModuleSVD, content_projection, module_block

    cfg = DescriptorConfig()
    g = torch.Generator().manual_seed(3)
    U = [torch.linalg.qr(torch.randn(24, 4, generator=g))[0] for _ in range(2)]   # 24 outputs <= 32 rows
    S = [torch.tensor([4.0, 2.0, 1.0, 0.5]), torch.tensor([3.0, 3.0, 1.0, 0.1])]
    V = [torch.linalg.qr(torch.randn(16, 4, generator=g))[0] for _ in range(2)]
    f = [module_block(ModuleSVD(u, s, v), cfg).reshape(-1)[cfg.block:].reshape(cfg.top_k, cfg.content_sketch)
         for u, s, v in zip(U, S, V)]
    exact = torch.linalg.norm((U[0] * S[0] / S[0].norm()).T @ (U[1] * S[1] / S[1].norm())) ** 2
    assert abs(float(np.linalg.norm(f[0] @ f[1].T) ** 2) - float(exact)) < 1e-4       # <G1, G2>_F kept exactly
    flipped = module_block(ModuleSVD(-U[0], S[0], -V[0]), cfg).reshape(-1)[cfg.block:]
    assert np.allclose(flipped, f[0].ravel(), atol=1e-6)
    P = content_projection(24, cfg)
    assert torch.allclose(P.T @ P, torch.eye(24), atol=1e-5)


def test_no_source_no_vector_and_never_its_own_text():
    X = np.eye(3, dtype=np.float32)
    V, has, used = neighbour_vectors(X, np.array([True, False, False]), np.array([[1.0, 0.0]], dtype=np.float32))
    assert not has[0] and has[1:].all()                            # the only source is not its own neighbour
    assert used == [[], [0], [0]]
    V, has, _ = neighbour_vectors(X, np.zeros(3, dtype=bool), np.zeros((0, 2), dtype=np.float32))
    assert not has.any() and not V.any()


def test_the_index_finds_a_bare_file_from_a_prompt_and_keeps_it_after_a_refresh(tmp_path):
    lib = tmp_path / "loras"
    concepts = ["zorbo", "glimmet", "hat", "checker", "stripes", "ball"]
    write_synthetic_library(lib, concepts, ranks=(4, 8), seeds=(0, 1), shapes=SMALL_TARGETS, name_style="concept")
    write_synthetic_library(lib / "bare", ["glimmet"], ranks=(8,), seeds=(7,), bare=["glimmet"],
                            shapes=SMALL_TARGETS, name_style="concept")
    cat = Catalog(lib / ".studio" / "catalog.sqlite")
    cat.scan(lib)
    index = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64))
    bare = cat.get("glimmet_r8_s7")
    assert not bare.description and bare.id in index.members["neighbours"]
    prompt = json.loads((lib / "glimmet_r4_s0.civitai.info").read_text())["description"]
    hits = index.search(prompt, k=len(index), mode="weights", family="tinyworld")
    ranked = [h.name for h in hits]
    assert ranked.index("glimmet_r8_s7") < 4                        # among the ghosts, from its weights alone
    assert set(hits[0].channels) == {"neighbours"}
    assert all(n.startswith("glimmet_") for n in index.resembles(bare.id))   # what its vector came from ...
    assert LibraryIndex.open(cat, text_embedder=HashingEmbedder(64)).resembles(bare.id) == index.resembles(bare.id)
    reasons = {h.id: reason(h, prompt, "character", "metadata", index) for h in hits}
    assert "its weights resemble glimmet_" in reasons[bare.id]             # ... and how a pick says so,
    assert all("resemble" not in r for i, r in reasons.items() if i != bare.id)   # only where it has no metadata
    # a new bare file: an incremental refresh gives it (and keeps everyone's) vector, reading no other file
    shutil.copy(write_lora(synthetic_lora("hat", 4, 9, SMALL_TARGETS), tmp_path / "x.safetensors"),
                lib / "bare" / "hat_r4_s9.safetensors")
    cat.scan(lib)
    report = index.refresh()
    assert report.files_read == 0 and len(report.added) == 1
    assert index.members["neighbours"] == set(index.entries)
    hat = index.vector("neighbours", cat.get("hat_r4_s9").id)
    near = max((i for i in index.members["meta"]), key=lambda i: float(index.vector("meta", i) @ hat))
    assert index.entries[near].name.startswith("hat_")
    # rebuilding the channel from a subset of sources and back gives the same scores as a fresh index (the query
    # baselines follow the channel: none is left from the subset's vectors)
    index.build_neighbours(sources={i for i in index.members["meta"] if not index.entries[i].name.startswith("glim")})
    assert index.search(prompt, k=1, family="tinyworld", mode="weights")[0].id != bare.id   # no ghost text to take
    index.build_neighbours()
    fresh = LibraryIndex.open(cat, text_embedder=HashingEmbedder(64))
    assert [(h.id, round(h.score, 6)) for h in index.search(prompt, k=10, family="tinyworld")] == \
        [(h.id, round(h.score, 6)) for h in fresh.search(prompt, k=10, family="tinyworld")]
