"""Text side: stemming, metadata captions, BM25 with matched words, and the pluggable embedders."""
import json

import numpy as np
import pytest
import torch

from retrieval.text import (ClipTextEmbedder, HashingEmbedder, HFMeanPoolEmbedder, LexicalIndex, Metadata,
                            TextEmbedder, captions, default_text_embedder, packaged_model_folder, stem, words)


def test_stem_and_words():
    assert stem("stripes") == stem("striped")
    assert stem("trees") == stem("tree")
    assert stem("glasses") == "glass"
    assert words("A Zorbix, wearing the hat-trick") == ["zorbix", "wearing", "hat", "trick"]


def test_metadata_and_captions():
    m = Metadata(name="lora_7", trigger_words=["zorbix", "red"], description="a round alien creature",
                 tags=["character", "alien"])
    assert m.has_text
    assert m.text().startswith("a round alien creature")
    caps = captions(m)
    assert "a round alien creature" in caps and any("zorbix" in c for c in caps) and len(caps) == len(set(caps))
    bare = Metadata(name="my_pixel_style")
    assert not bare.has_text and captions(bare) == [] and "pixel" in bare.text()
    assert m.hash() != bare.hash()


def _lexical():
    docs = [
        (1, Metadata("ghosty", ["glimmet"], "a floating ghost with a wavy hem", ["character", "ghost"]), "tinyworld"),
        (2, Metadata("hat", ["hatzel"], "wearing a tall black top hat", ["clothing", "top hat"]), "tinyworld"),
        (3, Metadata("sd_ghost", ["spookgirl"], "a ghost girl", ["character"]), "sd15"),
        (4, Metadata("lora_0004"), "tinyworld"),
    ]
    return LexicalIndex().build(docs)


def test_bm25_scores_matched_words_and_family():
    lex = _lexical()
    hits = lex.search("a ghost wearing a hat")
    assert {h.id for h in hits} == {1, 2, 3}
    by_id = {h.id: h for h in hits}
    assert by_id[1].matched == ["ghost"] and set(by_id[2].matched) == {"wearing", "hat"}
    assert all(0 < h.score <= 1 for h in hits)
    assert {h.id for h in lex.search("a ghost", family="tinyworld")} == {1}
    assert lex.search("glimmet")[0].id == 1  # trigger words count most
    assert lex.search("motorcycle") == []
    assert lex.df(stem("ghost")) == 2 and stem("hat") in lex.vocab


def test_hashing_embedder_is_deterministic_and_normalised():
    emb = HashingEmbedder(64)
    assert isinstance(emb, TextEmbedder)
    a = emb.encode(["a striped ball", "a ball with stripes", "a golden key"])
    assert a.shape == (3, 64) and np.allclose(np.linalg.norm(a, axis=1), 1)
    assert a[0] @ a[1] > a[0] @ a[2]
    assert np.array_equal(a, HashingEmbedder(64).encode(["a striped ball", "a ball with stripes", "a golden key"]))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.tinyworld.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok = build_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407))
    te.save_pretrained(folder / "text_encoder")
    return folder, te, tok


def test_clip_text_embedder(tiny_clip):
    folder, te, tok = tiny_clip
    emb = ClipTextEmbedder(te, tok)
    x = emb.encode(["a red circle", "a red circle on a black background", ""])
    assert x.shape == (3, 32) and np.isfinite(x).all() and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    again = ClipTextEmbedder.from_folder(folder)
    assert np.allclose(again.encode(["a red circle"]), x[:1], atol=1e-5)
    assert again.fingerprint().endswith(emb.fingerprint().split(":")[-1])
    eos = ClipTextEmbedder(te, tok, pooling="eos").encode(["a red circle"])
    assert eos.shape == (1, 32)
    assert isinstance(default_text_embedder(folder, prefer="clip"), ClipTextEmbedder)
    with pytest.raises(FileNotFoundError):
        ClipTextEmbedder.from_folder(folder / "nothing")


def _tiny_bert(folder, fast: bool = True):
    from transformers import BertConfig, BertModel, BertTokenizer, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "ghost", "hat", "ball", "key", "the"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (BertTokenizerFast if fast else BertTokenizer)(str(folder / "vocab.txt")).save_pretrained(folder)
    if not fast:   # an older folder: vocab.txt, no tokenizer.json
        (folder / "tokenizer.json").unlink(missing_ok=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)


@pytest.mark.parametrize("fast", [True, False], ids=["tokenizer.json", "vocab.txt only"])
def test_sentence_model_reader_matches_transformers(tmp_path, fast):
    """`retrieval.bert` (no transformers import in scan workers) gives transformers' BertModel hidden states and
    token ids, and its state dict, so the embedder's fingerprint is the same."""
    from transformers import AutoModel, AutoTokenizer

    from retrieval.bert import BertEncoder, BertTokenizer
    from retrieval.text import _hash_state

    _tiny_bert(tmp_path, fast)
    assert (tmp_path / "tokenizer.json").is_file() == fast
    texts = ["a red ghost", "the hat, the key and a ball", "Red GHOST unknownword " * 40, " "]
    ours = BertTokenizer(tmp_path).encode(texts, 32)
    assert ours == AutoTokenizer.from_pretrained(str(tmp_path))(texts, truncation=True, max_length=32)["input_ids"]
    ids, mask = BertTokenizer(tmp_path).pad(ours)
    model, ref = BertEncoder.from_folder(tmp_path), AutoModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        a, b = model(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)
    assert _hash_state(model) == _hash_state(ref)


def test_sentence_model_reader_names_a_folder_it_cannot_read(tmp_path):
    from retrieval.bert import BertEncoder, BertTokenizer

    _tiny_bert(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(conf, model_type="roberta")))
    with pytest.raises(ValueError, match=f"{tmp_path}.*not a BERT model"):
        BertEncoder.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        BertTokenizer(tmp_path)


def test_local_sentence_model_and_packaged_folder(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_minilm_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _tiny_bert(pkg / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    folder = packaged_model_folder("fake_minilm_pkg")
    assert folder == pkg / "model"
    emb = HFMeanPoolEmbedder(folder)
    x = emb.encode(["a red ghost", "a hat", "the key"])
    assert x.shape == (3, 16) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert emb.fingerprint() == HFMeanPoolEmbedder(folder).fingerprint()
    assert packaged_model_folder("no_such_package_here") is None
    assert isinstance(default_text_embedder(None, prefer="auto"), (HashingEmbedder, HFMeanPoolEmbedder))
