"""A BERT encoder (the architecture of MiniLM sentence models) in plain PyTorch, read from a local model folder.

The packaged sentence model (all-MiniLM-L6-v2) embeds every LoRA's metadata in each catalog-scan worker and the
prompts of every query. Through `transformers` each process paid ~3.4 s to import it and build the model before
its first sentence; this module loads the same folder (config.json, model.safetensors or pytorch_model.bin,
tokenizer.json) in a fraction of that with `safetensors` and `tokenizers`, and computes the same hidden states
(tests compare it with `transformers.BertModel`). Its parameters carry `BertModel`'s names, so its state dict, and
the embedder fingerprint made from it, are those of the `transformers` model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], h, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], h)
        self.token_type_embeddings = nn.Embedding(cfg.get("type_vocab_size", 2), h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.get("layer_norm_eps", 1e-12))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Dense(nn.Module):
    """A linear layer followed by a residual LayerNorm (BERT's "output" blocks)."""

    def __init__(self, n_in: int, n_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _SelfAttention(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)


class _Attention(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        setattr(self, "self", _SelfAttention(h))   # BertModel's parameter names: attention.self.query …
        self.output = _Dense(h, h, eps)


class _Intermediate(nn.Module):
    def __init__(self, h: int, n: int):
        super().__init__()
        self.dense = nn.Linear(h, n)


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.heads = cfg["num_attention_heads"]
        self.act = ACTIVATIONS[cfg.get("hidden_act", "gelu")]
        self.attention = _Attention(h, eps)
        self.intermediate = _Intermediate(h, cfg["intermediate_size"])
        self.output = _Dense(cfg["intermediate_size"], h, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        sa = getattr(self.attention, "self")
        split = lambda t: t.view(b, n, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(sa.query(x)), split(sa.key(x)), split(sa.value(x)), attn_mask=mask)
        x = self.attention.output(att.transpose(1, 2).reshape(b, n, h), x)
        return self.output(self.act(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))


class _Pooler(nn.Module):   # unused by mean pooling; kept so the state dict is BertModel's
    def __init__(self, h: int):
        super().__init__()
        self.dense = nn.Linear(h, h)


class BertEncoder(nn.Module):
    """``BertEncoder.from_folder(folder)(ids, attention_mask)`` -> last hidden states (b, n, hidden)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.pooler = _Pooler(cfg["hidden_size"])

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        # padded keys are not attended to: an additive mask, as BertModel builds it
        mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    @classmethod
    def from_folder(cls, folder: str | Path) -> BertEncoder:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("position_embedding_type", "absolute") != "absolute" \
                or cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"{folder}: not a BERT model this reader knows (model_type {cfg.get('model_type')!r}, "
                             f"position embeddings {cfg.get('position_embedding_type')!r}, activation "
                             f"{cfg.get('hidden_act')!r}); use a BERT/MiniLM sentence model folder")
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / "model.safetensors"))
        else:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        state = {k.removeprefix("bert."): v for k, v in state.items() if not k.endswith("position_ids")}
        model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        return model.float().eval()


class BertTokenizer:
    """The folder's `tokenizer.json` through `tokenizers` (the fast tokenizer `transformers` itself wraps), or a
    WordPiece tokenizer built from its `vocab.txt` (older folders): ``encode(texts, max_length)`` -> token id lists
    with [CLS] … [SEP], truncated."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            conf = folder / "tokenizer_config.json"
            lower = json.loads(conf.read_text()).get("do_lower_case", True) if conf.is_file() else True
            self.tokenizer = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
        else:
            raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt: a sentence model folder "
                                    f"needs its tokenizer")
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        self.tokenizer.enable_truncation(max_length)
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), right-padded to the longest."""
        n = max(map(len, ids))
        out = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return out, mask

