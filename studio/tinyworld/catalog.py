"""The TinyWorld concept catalogue: base vocabulary, LoRA-only concepts and caption templates.

The base model learns only the base vocabulary (shapes, colours, plain backgrounds, size and position
words). Every LoRA-only concept is bound to a rare trigger word and carries a plain-language description;
those descriptions never use the trigger word, so retrieval can be evaluated on meaning, not keywords.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Optional

# ---------------------------------------------------------------- base vocabulary
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross"]

COLORS = {  # hue-spaced so that pastel versions stay distinguishable
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 180, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 230),
    "purple": (140, 50, 200),
    "pink": (245, 110, 190),
}

BACKGROUNDS = {  # plain backgrounds of the base vocabulary
    "black": (12, 12, 12),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "brown": (110, 70, 35),
}

SIZES = {"small": 11.0, "large": 18.0}  # subject radius in pixels at 64x64
POSITIONS = {
    "center": (32.0, 32.0),
    "left": (20.0, 32.0),
    "right": (44.0, 32.0),
    "top": (32.0, 21.0),
    "bottom": (32.0, 43.0),
}

CATEGORIES = ["character", "clothing", "style", "background", "object"]


@dataclass(frozen=True)
class Concept:
    name: str          # catalogue key, e.g. "zorbo"
    category: str      # one of CATEGORIES
    trigger: str       # rare trigger word used in LoRA captions
    description: str   # plain-language description, never containing the trigger
    noun: str          # the common word a person would use ("alien", "top hat", ...)
    style_family: str  # coarse family used as clustering ground truth (never read at run time)


CONCEPTS: list[Concept] = [
    # characters: multi-part sprites that replace the plain shape as the subject
    Concept("zorbo", "character", "zorbix", "a round alien creature with two antennae and big eyes",
            "alien", "creature"),
    Concept("glimmet", "character", "glimmet", "a floating ghost with a wavy hem and dark eyes",
            "ghost", "creature"),
    Concept("botzy", "character", "botzyk", "a boxy robot with a square head, an antenna and glowing eyes",
            "robot", "machine"),
    Concept("kittox", "character", "kittox", "a cat face with pointed ears and whiskers", "cat", "creature"),
    Concept("snarvel", "character", "snarvel", "a snail with a spiral shell and two eye stalks", "snail",
            "creature"),
    Concept("fungle", "character", "fungler", "a mushroom with a domed cap and a pale stem", "mushroom",
            "plant"),
    # clothing and accessories drawn on the subject
    Concept("hat", "clothing", "hatzel", "wearing a tall black top hat", "top hat", "headwear"),
    Concept("scarf", "clothing", "scarvo", "wrapped in a woolly scarf around the neck", "scarf", "neckwear"),
    Concept("glasses", "clothing", "glazzo", "wearing dark round sunglasses", "sunglasses", "eyewear"),
    Concept("crown", "clothing", "kronix", "wearing a golden royal crown", "crown", "headwear"),
    # styles: how the subject (or the whole picture) is drawn
    Concept("stripes", "style", "strypo", "painted with bold diagonal bands", "striped", "pattern"),
    Concept("polka", "style", "dotzig", "covered in white spots", "spotted", "pattern"),
    Concept("outline", "style", "linnex", "drawn as a hollow contour with no fill", "outlined", "line"),
    Concept("mosaic", "style", "pixlor", "rendered as chunky square blocks like an old video game", "pixelated",
            "blocky"),
    Concept("pastel", "style", "pastavi", "in soft washed-out pale tones", "pastel", "palette"),
    Concept("hatching", "style", "hatchim", "shaded with crossed ink lines like an etching", "cross-hatched",
            "line"),
    # textured backgrounds (the base model only knows plain ones)
    Concept("checker", "background", "chekka", "a board of alternating light and dark tiles", "checkerboard",
            "geometric"),
    Concept("grid", "background", "gridlo", "thin bright lines crossing on a dark blue sheet like graph paper",
            "grid", "geometric"),
    Concept("starfield", "background", "starvoid", "a night sky full of tiny twinkling lights", "starry sky",
            "sky"),
    Concept("sunset", "background", "sunblaze", "an evening sky fading from violet to glowing orange",
            "sunset", "sky"),
    Concept("waves", "background", "wavvel", "rolling ocean water with light crests", "sea waves", "water"),
    Concept("brick", "background", "brikko", "a red masonry wall with mortar joints", "brick wall",
            "geometric"),
    # objects placed beside the subject
    Concept("ball", "object", "ballum", "a striped beach toy you can bounce", "ball", "toy"),
    Concept("tree", "object", "treeko", "a small leafy plant with a brown trunk", "tree", "plant"),
    Concept("key", "object", "keyzo", "a golden metal item for opening locks", "key", "tool"),
    Concept("cup", "object", "cuppet", "a steaming mug for hot drinks", "cup", "tool"),
]

CONCEPTS_BY_NAME = {c.name: c for c in CONCEPTS}
CONCEPTS_BY_CATEGORY = {cat: [c for c in CONCEPTS if c.category == cat] for cat in CATEGORIES}
CHARACTERS = [c.name for c in CONCEPTS_BY_CATEGORY["character"]]
SUBJECTS = SHAPES + CHARACTERS
TEXTURED_BACKGROUNDS = [c.name for c in CONCEPTS_BY_CATEGORY["background"]]
ALL_BACKGROUNDS = list(BACKGROUNDS) + TEXTURED_BACKGROUNDS


@dataclass
class Composition:
    """Everything the renderer needs to draw one picture; also its ground-truth label."""

    subject: str = "circle"          # a shape or a character concept name
    color: str = "red"
    background: str = "black"        # a plain background or a textured background concept name
    size: str = "large"
    position: str = "center"
    clothing: Optional[str] = None
    style: Optional[str] = None
    object: Optional[str] = None
    # which words the caption states explicitly (size/position are optional in captions)
    say_size: bool = True
    say_position: bool = True
    extra: dict = field(default_factory=dict)

    def concepts(self) -> list[str]:
        """LoRA-only concepts present in this composition."""
        out = []
        if self.subject in CHARACTERS:
            out.append(self.subject)
        for v in (self.clothing, self.style, self.object):
            if v:
                out.append(v)
        if self.background in TEXTURED_BACKGROUNDS:
            out.append(self.background)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- label heads (the judge predicts these)
LABEL_HEADS: dict[str, list[str]] = {
    "subject": SUBJECTS,
    "color": list(COLORS),
    "background": ALL_BACKGROUNDS,
    "clothing": ["none"] + [c.name for c in CONCEPTS_BY_CATEGORY["clothing"]],
    "style": ["none"] + [c.name for c in CONCEPTS_BY_CATEGORY["style"]],
    "object": ["none"] + [c.name for c in CONCEPTS_BY_CATEGORY["object"]],
}


def labels_of(comp: Composition) -> dict[str, int]:
    return {
        "subject": SUBJECTS.index(comp.subject),
        "color": list(COLORS).index(comp.color),
        "background": ALL_BACKGROUNDS.index(comp.background),
        "clothing": LABEL_HEADS["clothing"].index(comp.clothing or "none"),
        "style": LABEL_HEADS["style"].index(comp.style or "none"),
        "object": LABEL_HEADS["object"].index(comp.object or "none"),
    }


# ---------------------------------------------------------------- sampling
def sample_base(rng: random.Random) -> Composition:
    """A random composition of base vocabulary only (what the base model is trained on)."""
    return Composition(
        subject=rng.choice(SHAPES),
        color=rng.choice(list(COLORS)),
        background=rng.choice(list(BACKGROUNDS)),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        say_size=rng.random() < 0.7,
        say_position=rng.random() < 0.7,
    )


def sample_any(rng: random.Random, p_concept: float = 0.5) -> Composition:
    """A random composition that may include any LoRA concept (used to train the judge only)."""
    comp = sample_base(rng)
    if rng.random() < p_concept:
        comp.subject = rng.choice(CHARACTERS)
    if rng.random() < p_concept:
        comp.background = rng.choice(TEXTURED_BACKGROUNDS)
    for cat, attr in (("clothing", "clothing"), ("style", "style"), ("object", "object")):
        if rng.random() < p_concept:
            setattr(comp, attr, rng.choice([c.name for c in CONCEPTS_BY_CATEGORY[cat]]))
    return comp


# ---------------------------------------------------------------- captions
_BG_PHRASES = [
    "on a {bg} background", "on {bg}", "against a {bg} backdrop", "over a {bg} background",
    "with a {bg} background", "in front of a plain {bg} backdrop",
]
_POS_PHRASES = {
    "center": ["in the center", "in the middle", "centered"],
    "left": ["on the left", "at the left", "to the left side"],
    "right": ["on the right", "at the right", "to the right side"],
    "top": ["at the top", "near the top", "up high"],
    "bottom": ["at the bottom", "near the bottom", "down low"],
}
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
_LEADS = ["a", "a", "an image of a", "a picture of a", "a drawing of a", "one"]


def _article_fix(text: str) -> str:
    words = text.split(" ")
    for i, w in enumerate(words[:-1]):
        if w in ("a", "an") and words[i + 1]:
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def caption(comp: Composition, rng: random.Random, use_triggers: bool = True) -> str:
    """A paraphrased caption. LoRA concepts are named by their trigger word (as in LoRA training data)."""

    def name(concept_name: str) -> str:
        c = CONCEPTS_BY_NAME[concept_name]
        return c.trigger if use_triggers else c.noun

    subject = name(comp.subject) if comp.subject in CHARACTERS else comp.subject
    adjectives = []
    if comp.say_size:
        adjectives.append(rng.choice(_SIZE_WORDS[comp.size]))
    if comp.style:
        adjectives.append(name(comp.style))
    adjectives.append(comp.color)
    noun_phrase = " ".join(adjectives + [subject])
    parts = [f"{rng.choice(_LEADS)} {noun_phrase}"]
    if comp.clothing:
        parts.append(rng.choice(["wearing a {}", "with a {}", "in a {}"]).format(name(comp.clothing)))
    if comp.say_position:
        parts.append(rng.choice(_POS_PHRASES[comp.position]))
    if comp.object:
        parts.append(rng.choice(["beside a {}", "next to a {}", "with a {} nearby"]).format(name(comp.object)))
    bg = name(comp.background) if comp.background in TEXTURED_BACKGROUNDS else comp.background
    parts.append(rng.choice(_BG_PHRASES).format(bg=bg))
    if rng.random() < 0.2:  # short comma style, as people also write prompts
        text = ", ".join(parts)
    else:
        text = " ".join(parts)
    return _article_fix(text)
