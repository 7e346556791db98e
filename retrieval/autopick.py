"""Auto-pick: prompt -> candidates -> a capped, explained set of LoRAs, and their trigger words in the prompt.

1. The prompt is searched whole and phrase by phrase (split at commas and at words such as "wearing", "on",
   "beside"), so "a ghost wearing sunglasses on a starry sky" can match a character, a clothing and a background
   LoRA. A LoRA keeps its best phrase. A prompt that already contains a LoRA's trigger word picks it outright.
2. Every LoRA has a category: from its tags (or description) when they name one, else from a nearest-neighbour
   classifier on the weight descriptor over the LoRAs whose category is known, else "other".
3. Candidates are taken best first; one under `threshold` ends the pick (nothing is picked when nothing fits),
   and each category has a cap (one character, one style, one background, ...). A candidate whose matched words
   a better pick of the same phrase matched too is explained away: in "a striped beach toy" the ball LoRA (its
   metadata names a striped beach toy) takes "striped", and the stripes style is not picked for it.
4. Each `Pick` says why: its score, the phrase and words that matched, and the score per channel.

`insert_triggers` then puts each pick's trigger word into the prompt (before the words it matched, or in front).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .text import contains_word, stem, words

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "character": ("character", "characters", "person", "creature", "mascot", "oc", "girl", "boy", "man", "woman",
                  "animal", "celebrity"),
    "clothing": ("clothing", "clothes", "outfit", "costume", "accessory", "accessories", "headwear", "eyewear",
                 "neckwear", "wearable", "garment"),
    "style": ("style", "styles", "artstyle", "aesthetic", "art style", "painting style", "medium", "palette"),
    "background": ("background", "backgrounds", "backdrop", "scenery", "setting", "environment", "landscape"),
    "object": ("object", "objects", "item", "items", "prop", "props"),
    "pose": ("pose", "poses", "gesture", "action"),
    "concept": ("concept", "concepts"),
}
DEFAULT_CAPS = {"character": 1, "style": 1, "background": 1, "pose": 1, "clothing": 2, "object": 2, "concept": 2,
                "other": 1}
DEFAULT_THRESHOLD = 0.3
_SPLIT = re.compile(
    r"[,;:.!?()\[\]]|\band\b|\bplus\b"
    r"|(?=\b(?:with|wearing|wears|dressed in|in a|beside|next to|near|on|against|in front of|over|under|behind|"
    r"holding|covered in|painted|drawn|rendered|shaded|in the style of)\b)",
    re.IGNORECASE,
)


@dataclass
class Pick:
    name: str
    category: str
    score: float
    matched_words: list[str]
    trigger: str | None
    reason: str
    phrase: str = ""
    channels: dict[str, float] = field(default_factory=dict)
    id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- categories
def category_from_metadata(tags: Sequence[str], description: str = "") -> str | None:
    """The category a LoRA's tags name (first match in tag order), else one its description names, else None."""
    lookup = {w: cat for cat, ws in CATEGORY_WORDS.items() for w in ws}
    for tag in tags:
        t = tag.strip().lower()
        if t in lookup:
            return lookup[t]
        for w in words(t):
            if w in lookup:
                return lookup[w]
    for w in words(description):
        if w in lookup and w not in ("man", "woman", "girl", "boy", "animal", "person", "action", "item", "setting"):
            return lookup[w]
    return None


def infer_categories(library, k: int = 5, min_labelled: int = 3) -> dict[int, tuple[str, str]]:
    """id -> (category, source) for every indexed LoRA; source is "metadata", "classifier" or "none".

    The classifier votes among the `k` labelled LoRAs of the same family nearest in descriptor space,
    weighted by similarity.
    """
    out: dict[int, tuple[str, str]] = {}
    labelled: dict[str, list[tuple[int, str]]] = {}
    for i, e in library.entries.items():
        cat = category_from_metadata(e.meta.tags, e.meta.description)
        if cat is not None:
            out[i] = (cat, "metadata")
            labelled.setdefault(e.family, []).append((i, cat))
    vectors = {}
    for i, e in library.entries.items():
        if i in out:
            continue
        pool = labelled.get(e.family, [])
        if len(pool) < min_labelled or "descriptor" not in library.vectors:
            out[i] = ("other", "none")
            continue
        if e.family not in vectors:
            vectors[e.family] = np.stack([library.vector("descriptor", j) for j, _ in pool])
        v = library.vector("descriptor", i)
        if v is None:
            out[i] = ("other", "none")
            continue
        sims = vectors[e.family] @ v
        votes: Counter = Counter()
        for j in np.argsort(-sims)[:k]:
            votes[pool[j][1]] += max(float(sims[j]), 0.0) + 1e-6
        out[i] = (votes.most_common(1)[0][0], "classifier")
    return out


def categories(library) -> dict[int, tuple[str, str]]:
    """Cached `infer_categories` of a `LibraryIndex` (recomputed after it changes)."""
    if getattr(library, "_categories", None) is None:
        library._categories = infer_categories(library)
    return library._categories


# ----------------------------------------------------------------------------------------------- phrases
def split_phrases(prompt: str) -> list[str]:
    """Phrases of a prompt that may each name one concept (empty and stop-word-only pieces dropped)."""
    parts = [p.strip() for p in _SPLIT.split(prompt) if p and p.strip()]
    return [p for p in parts if words(p)]


# ----------------------------------------------------------------------------------------------- auto-pick
def reason(hit, query: str, category: str, source: str, library) -> str:
    """Why a search hit fits a query, in words: score per channel, shared words, and for a LoRA with no metadata
    of its own the LoRAs its weights resemble (whose text the ``neighbours`` channel gave it)."""
    chan = ", ".join(f"{c} {v:.2f}" for c, v in sorted(hit.channels.items()))
    why = f"'{query}' matches this {category} LoRA: score {hit.score:.2f} ({chan})"
    if hit.matched:
        why += f"; shared words: {', '.join(hit.matched)}"
    bare = "neighbours" in hit.channels and hit.id not in library.members.get("meta", ())
    like = library.resembles(hit.id) if bare else []
    if like:
        why += f"; no metadata, its weights resemble {', '.join(like)}"
    if source == "classifier":
        why += "; category guessed from its weights"
    return why


def autopick(prompt: str, library, k: int = 3, family: str | Sequence[str] | None = None,
             threshold: float = DEFAULT_THRESHOLD, caps: Mapping[str, int] | None = None, mode: str = "fused",
             per_phrase: bool = True, depth: int = 20) -> list[Pick]:
    """Up to `k` LoRAs for `prompt` from a `LibraryIndex`, capped per category; [] when nothing fits."""
    caps = dict(DEFAULT_CAPS, **(caps or {}))
    cats = categories(library)
    fams = library.families(family)
    best: dict[int, Pick] = {}

    # 1. a trigger word written in the prompt picks its LoRA outright (`LibraryIndex.named`)
    for i in library.named(prompt, fams):
        e = library.entries[i]
        trig = e.trigger
        cat = cats.get(i, ("other", "none"))[0]
        best[i] = Pick(e.name, cat, 1.0, [trig], trig, f"the prompt names its trigger word '{trig}'", trig,
                       {"trigger": 1.0}, i)

    # 2. whole prompt and each phrase
    phrases = split_phrases(prompt) if per_phrase else []
    queries = [prompt] + [p for p in phrases if p.lower() != prompt.strip().lower()]
    results = library.search_many(queries, k=depth, family=family, mode=mode)
    for query, hits in zip(queries, results):
        for h in hits:
            if h.id in best and best[h.id].score >= h.score:
                continue
            cat, source = cats.get(h.id, ("other", "none"))
            best[h.id] = Pick(h.name, cat, round(float(h.score), 4), list(h.matched), h.trigger,
                              reason(h, query, cat, source, library), query,
                              dict(h.channels), h.id)

    # 3. best first, under the threshold nothing more, per-category caps
    #    and no second version of one concept: same trigger word, or same category for the same phrase (the
    #    whole prompt of a several-phrase prompt excepted: "a key beside a ball" may well pick two objects)
    picks: list[Pick] = []
    used: Counter = Counter()
    whole = prompt.strip().lower()

    def same_concept(p: Pick, q: Pick) -> bool:
        if p.trigger and q.trigger and p.trigger.lower() == q.trigger.lower():
            return True
        phrase = p.phrase.lower()
        return p.category == q.category and phrase == q.phrase.lower() and (len(queries) == 1 or phrase != whole)

    def explained(p: Pick, q: Pick) -> bool:   # every word p matched, a better pick of the same phrase matched too
        words_p = {w.lower() for w in p.matched_words}
        return bool(words_p) and p.phrase.lower() == q.phrase.lower() \
            and words_p <= {w.lower() for w in q.matched_words}

    for p in sorted(best.values(), key=lambda p: (-p.score, p.name)):
        if len(picks) >= k or p.score < threshold:
            break
        cap = caps.get(p.category, caps.get("other", 1))
        if used[p.category] >= cap or any(same_concept(p, q) or explained(p, q) for q in picks):
            continue
        used[p.category] += 1
        picks.append(p)
    return picks


def insert_triggers(prompt: str, picks: Sequence[Pick], mode: str = "inline") -> str:
    """The prompt with each pick's trigger word added (unless it is already there).

    ``inline`` puts a trigger right before the first prompt word its LoRA matched ("a floating ghost" ->
    "a floating glimmet ghost"), or in front of the prompt when no word matched; ``prepend`` puts them all in
    front, comma-separated, as A1111 users do.
    """
    todo, seen = [], set()
    for p in picks:
        if p.trigger and p.trigger.lower() not in seen and not contains_word(prompt, p.trigger):
            seen.add(p.trigger.lower())
            todo.append(p)
    front: list[str] = []
    inserts: list[tuple[int, str]] = []
    for p in todo:
        pos = None
        if mode == "inline":
            targets = {stem(w) for w in p.matched_words}
            tags = [(t.start(), t.end()) for t in re.finditer(r"<[^<>]*>", prompt)]  # never inside <lora:...>
            for m in re.finditer(r"[A-Za-z0-9']+", prompt):
                if any(a <= m.start() < b for a, b in tags):
                    continue
                if stem(m.group().lower()) in targets or m.group().lower() in targets:
                    pos = m.start()
                    break
        if pos is None:
            front.append(p.trigger)
        else:
            inserts.append((pos, p.trigger))
    out = prompt
    for pos, trig in sorted(inserts, key=lambda t: -t[0]):
        head = out[:pos]
        article = re.search(r"(?<![\w-])(a|an|A|An)\s+$", head)
        if article:  # "an alien" -> "a zorbix alien"
            word = ("an" if trig[:1].lower() in "aeiou" else "a")
            word = word.capitalize() if article.group(1)[0].isupper() else word
            head = head[:article.start(1)] + word + head[article.end(1):]
        out = head + trig + " " + out[pos:]
    if front:
        out = ", ".join(front) + (", " + out if out.strip() else "")
    return out


def explain(picks: Sequence[Pick]) -> str:
    """One line per pick, for the CLI and the UI."""
    if not picks:
        return "no LoRA fits this prompt"
    return "\n".join(f"{p.name} [{p.category}] {p.score:.2f}: {p.reason}" for p in picks)
