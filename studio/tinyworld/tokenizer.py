"""Build a transformers CLIPTokenizer offline from the BPE vocabulary that open_clip ships.

The result has the same ids as open_clip's SimpleTokenizer (and as SD1.5's tokenizer): the vocabulary is
the 256 byte symbols, the same with ``</w>``, the first 48 894 merges, then the two special tokens.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs that `CLIPTokenizer.from_pretrained` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def compact_tokenizer_json(folder: str | Path) -> None:
    """Rewrite the folder's `tokenizer.json` without indentation: `save_pretrained` pretty-prints it (3.6 MB for
    the CLIP vocabulary and merges), the same content fits in 1.7 MB and loads to the same tokenizer."""
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def build_clip_tokenizer(folder: str | Path, model_max_length: int = 77):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, model_max_length)
    return CLIPTokenizer.from_pretrained(str(folder))
