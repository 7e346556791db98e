"""VectorIndex: add/remove/replace, family as a hard filter, persistence, IVF recall (fp16 and 8-bit codes) against exact search."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.index import VectorIndex, normalise, recall_at_k


def _vecs(n, d=16, seed=0):
    return normalise(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def test_add_search_remove_replace():
    vi = VectorIndex(16)
    x = _vecs(10)
    vi.add(range(10), x, "tinyworld")
    assert len(vi) == 10 and vi.count("tinyworld") == 10
    d, i = vi.search(x[3], 3, "tinyworld")
    assert i[0, 0] == 3 and abs(d[0, 0] - 1) < 1e-5
    assert vi.remove([3, 4, 99]) == 2
    _, i = vi.search(x[3], 10, "tinyworld")
    assert 3 not in i[0] and 4 not in i[0] and (i[0] == -1).sum() == 2  # only 8 left: two empty slots
    vi.add([5], x[0], "tinyworld")  # re-adding an id replaces its vector
    _, i = vi.search(x[0], 2, "tinyworld")
    assert set(i[0]) == {0, 5} and len(vi) == 8
    assert sorted(vi.ids()) == [0, 1, 2, 5, 6, 7, 8, 9]
    assert np.allclose(vi.reconstruct(5), x[0], atol=1e-6)
    with pytest.raises(ValueError):
        vi.add([1, 1], _vecs(2), "tinyworld")


def test_family_is_a_hard_filter():
    vi = VectorIndex(16)
    x = _vecs(20)
    vi.add(range(10), x[:10], "tinyworld")
    vi.add(range(10, 20), x[10:], "sd15")
    # a query identical to an sd15 vector still gets only tinyworld results
    d, i = vi.search(x[15], 20, "tinyworld")
    found = i[0][i[0] >= 0]
    assert set(found) == set(range(10))
    d, i = vi.search(x[15], 1, ["sd15", "tinyworld"])
    assert i[0, 0] == 15
    d, i = vi.search(x[15], 5, "sdxl")
    assert (i == -1).all() and np.isneginf(d).all()
    vi.add([3], x[15], "sd15")  # moving an id to another family removes it from the first
    assert 3 not in vi.ids("tinyworld") and 3 in vi.ids("sd15")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["sd15", "sdxl", "tinyworld"]), min_size=1, max_size=40), st.integers(0, 10_000))
def test_family_filter_property(families, seed):
    vi = VectorIndex(8)
    x = _vecs(len(families), 8, seed)
    vi.add(range(len(families)), x, families)
    q = _vecs(3, 8, seed + 1)
    for fam in ("sd15", "sdxl", "tinyworld"):
        _, i = vi.search(q, len(families), fam)
        got = {int(v) for v in i.ravel() if v >= 0}
        assert got == {j for j, f in enumerate(families) if f == fam}


def test_save_load_roundtrip(tmp_path):
    vi = VectorIndex(16)
    x = _vecs(30)
    vi.add(range(30), x, ["a"] * 15 + ["b"] * 15)
    path = vi.save(tmp_path / "x.faiss")
    again = VectorIndex.load(path)
    assert again.families == ["a", "b"] and len(again) == 30
    for fam in ("a", "b"):
        d1, i1 = vi.search(x[:5], 4, fam)
        d2, i2 = again.search(x[:5], 4, fam)
        assert np.array_equal(i1, i2) and np.allclose(d1, d2)
    with pytest.raises(ValueError):
        VectorIndex.from_bytes(b"garbage!" * 4)


def _clustered(n, d, seed, centres=64, spread=0.35):
    c = np.random.default_rng(1234).standard_normal((centres, d)).astype(np.float32)  # shared by data and queries
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return normalise(x)


@pytest.mark.parametrize("codec", ["fp16", "sq8"])
def test_ivf_above_threshold_keeps_recall(codec):
    d, n = 32, 6000
    x = _clustered(n, d, 0)
    vi = VectorIndex(d, ivf_threshold=2000, target_recall=0.97, codec=codec)
    vi.add(np.arange(n), x, "tinyworld")
    stats = vi.stats()["tinyworld"]
    assert stats.kind == "ivf" and stats.nlist >= 16 and 1 <= stats.nprobe <= stats.nlist
    flat = VectorIndex(d, ivf_threshold=10**9)
    flat.add(np.arange(n), x, "tinyworld")
    q = _clustered(200, d, 1)
    _, gt = flat.search(q, 10, "tinyworld")
    _, got = vi.search(q, 10, "tinyworld")
    assert recall_at_k(got, gt) >= 0.95
    # still editable: remove and add, and it survives a save/load
    vi.remove(gt[:, 0])
    _, got = vi.search(q, 10, "tinyworld")
    assert not set(gt[:, 0].tolist()) & set(got.ravel().tolist())
    again = VectorIndex.from_bytes(vi.to_bytes())
    assert again.stats()["tinyworld"].nprobe == vi.stats()["tinyworld"].nprobe and again.codec == codec
    assert again.reconstruct(int(got[0, 0])) is not None


def test_recall_at_k():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)
