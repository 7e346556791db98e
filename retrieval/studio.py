"""What `Studio` calls for retrieval: ``Studio.retrieve(prompt, k)`` and ``generate(loras="auto")``.

The index lives beside the Studio's catalog and is refreshed on first use. Text side: the base model's own text
encoder (the pipeline's ``text_encoder``), unless a trained weight encoder says it was trained against another
embedder (e.g. a packaged sentence model). A weight encoder is used when one is found at
``<library>/.studio/retrieval_encoder.safetensors`` or ``assets/retrieval/encoder_<family>.safetensors``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from studio.library.catalog import cache_dir

from .autopick import DEFAULT_THRESHOLD, Pick, autopick, insert_triggers
from .library import LibraryIndex
from .text import ClipTextEmbedder, HFMeanPoolEmbedder, default_text_embedder, packaged_model_folder

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "retrieval"
ENCODER_FILE = "retrieval_encoder.safetensors"


def find_encoder(library: Path | None, family: str) -> Path | None:
    for path in ([cache_dir(library) / ENCODER_FILE] if library else []) + [ASSETS / f"encoder_{family}.safetensors"]:
        if path.is_file():
            return path
    return None


def text_embedder_for(studio, encoder=None):
    """The text embedder for a Studio's library.

    With a weight encoder: the embedder it was trained against (its fingerprint says which). Without one: a
    packaged sentence model when installed (it understands paraphrases), else the pipeline's own text encoder.
    """
    wanted = encoder.config.text_embedder if encoder is not None else ""
    pipe = getattr(studio, "pipe", None)
    own = None
    if pipe is not None and getattr(pipe, "text_encoder", None) is not None:
        own = ClipTextEmbedder(pipe.text_encoder, pipe.tokenizer, name=f"clip:{Path(studio.model_path).name}")
    if wanted.startswith("clip") and own is not None:
        return own
    if not wanted.startswith("clip"):
        folder = packaged_model_folder()
        if folder is not None:
            return HFMeanPoolEmbedder(folder, name="all-MiniLM-L6-v2")
    return own or default_text_embedder(getattr(studio, "model_path", None))


def library_index(studio, refresh: bool = True) -> LibraryIndex:
    """The Studio's `LibraryIndex` (built once per Studio, refreshed against the catalog on first use)."""
    lib = getattr(studio, "_retrieval_index", None)
    if lib is None:
        from .encoder import LoRAEncoder

        catalog = studio.catalog
        path = find_encoder(Path(studio.library) if studio.library else None, studio.family)
        encoder = LoRAEncoder.load(path) if path else None
        lib = LibraryIndex(catalog, text_embedder=text_embedder_for(studio, encoder), encoder=encoder)
        studio._retrieval_index = lib
        if refresh:
            lib.refresh()
    elif refresh:
        lib.refresh()
    return lib


def retrieve(studio, prompt: str, k: int = 5, threshold: float = DEFAULT_THRESHOLD, **kw) -> list[Pick]:
    """`autopick` over the Studio's library, restricted to the Studio's base family."""
    return autopick(prompt, library_index(studio), k=k, family=studio.family, threshold=threshold, **kw)


def auto_loras(studio, prompt: str, k: int = 3, weight: float = 1.0, insert: str = "inline",
               **kw) -> tuple[str, list, list[Pick]]:
    """(prompt with trigger words, `fusion.LoRARef`s, picks) for ``generate(loras="auto")``.

    Picks are made on the prompt without its ``<lora:...>`` tags; LoRAs the tags already name are not picked
    again."""
    from fusion import LoRARef, parse_prompt

    clean, named = parse_prompt(prompt)
    taken = set()
    for ref in named:
        try:
            taken.add(studio.catalog.get(ref.name).id)
        except KeyError:
            pass  # the Studio reports an unknown name itself
    picks = [p for p in retrieve(studio, clean, k=k + len(taken), **kw) if p.id not in taken][:k]
    refs = [LoRARef(p.name, weight, category=p.category) for p in picks]
    return insert_triggers(prompt, picks, mode=insert), refs, picks


def resolve_loras(studio, prompts: Sequence[str], loras, **kw) -> tuple[list[str], list | None, list[Pick]]:
    """Replace ``loras="auto"`` for a call's prompts (which share one LoRA set): picks come from the first
    prompt, and every prompt gets the trigger words."""
    if not (isinstance(loras, str) and loras == "auto"):
        return list(prompts), loras, []
    _, refs, picks = auto_loras(studio, prompts[0], **kw)
    return [insert_triggers(p, picks) for p in prompts], refs, picks
