"""A generation recipe, written into PNGs both as A1111 `parameters` text and as a `studio` JSON chunk."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

A1111_SAMPLERS = {"dpm++": "DPM++ 2M", "ddim": "DDIM"}  # our scheduler name -> A1111's sampler name

_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^:>]+)[^>]*>")
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # as A1111 parses its infotext
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class Recipe:
    """Everything needed to regenerate an image. `loras` items are {"name", "weight", "hash"}."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    cfg: float = 7.0
    sampler: str = "dpm++"
    width: int = 64
    height: int = 64
    model: str = ""
    model_hash: str = ""
    loras: list[dict] = field(default_factory=list)
    method: str = ""
    method_params: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Build from `to_dict()` output; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        recipe = cls(**{k: v for k, v in data.items() if k in names})
        recipe.loras = [{"name": l["name"], "weight": float(l["weight"]), "hash": l.get("hash", "")} for l in recipe.loras]
        return recipe

    def prompt_with_loras(self) -> str:
        """The prompt followed by A1111 `<lora:name:weight>` tags."""
        tags = [f"<lora:{l['name']}:{_number(l['weight'])}>" for l in self.loras]
        return " ".join([self.prompt, *tags] if self.prompt else tags)

    def to_a1111_parameters(self) -> str:
        """The `parameters` text A1111 writes (and reads back into its UI)."""
        lora_hashes = ", ".join(f"{l['name']}: {l['hash']}" for l in self.loras if l.get("hash"))
        params = {
            "Steps": self.steps,
            "Sampler": A1111_SAMPLERS.get(self.sampler, self.sampler),
            "CFG scale": _number(self.cfg),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
            "Lora hashes": lora_hashes,
        }
        lines = [self.prompt_with_loras()]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items() if v != ""))
        return "\n".join(lines)

    @classmethod
    def from_a1111_parameters(cls, text: str) -> Recipe:
        """Parse A1111 `parameters` text; LoRA tags move from the prompt to `loras`, unknown fields to `extras`."""
        *lines, last = text.strip().split("\n")
        if len(_PARAM.findall(last)) < 3:  # no settings line
            lines, last = lines + [last], ""
        prompt, negative = [], []
        for line in lines:
            if line.startswith("Negative prompt:"):
                negative.append(line[len("Negative prompt:"):].strip())
            elif negative:
                negative.append(line)
            else:
                prompt.append(line)
        prompt = "\n".join(prompt)
        params = {k: _unquote(v) for k, v in _PARAM.findall(last)}

        hashes = dict(h.split(": ", 1) for h in params.pop("Lora hashes", "").split(", ") if ": " in h)
        loras = [{"name": n, "weight": float(w), "hash": hashes.get(n, "")} for n, w in _LORA_TAG.findall(prompt)]
        samplers = {v: k for k, v in A1111_SAMPLERS.items()}
        recipe = cls(prompt=_LORA_TAG.sub("", prompt).strip(), negative_prompt="\n".join(negative), loras=loras)
        if "Steps" in params:
            recipe.steps = int(params.pop("Steps"))
        if "Sampler" in params:
            name = params.pop("Sampler")
            recipe.sampler = samplers.get(name, name)
        if "CFG scale" in params:
            recipe.cfg = float(params.pop("CFG scale"))
        if "Seed" in params:
            recipe.seed = int(params.pop("Seed"))
        size = _SIZE.match(params.get("Size", ""))
        if size:
            recipe.width, recipe.height = int(size[1]), int(size[2])
            params.pop("Size")
        recipe.model_hash = params.pop("Model hash", "")
        recipe.model = params.pop("Model", "")
        recipe.extras = params
        return recipe


def save_png(image: Image.Image, path: str | Path, recipe: Recipe) -> Path:
    """Save `image` as PNG with a `parameters` (A1111) and a `studio` (JSON) text chunk."""
    info = PngInfo()
    info.add_text("parameters", recipe.to_a1111_parameters())
    info.add_text("studio", json.dumps(recipe.to_dict()))
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_recipe(path: str | Path) -> Recipe:
    """The recipe of a PNG: the `studio` JSON chunk, else the A1111 `parameters` text."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
    if "studio" in text:
        return Recipe.from_dict(json.loads(text["studio"]))
    if "parameters" in text:
        return Recipe.from_a1111_parameters(text["parameters"])
    raise ValueError(f"{path} has no generation parameters")


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256.

    For a diffusers folder: of its weight files (`*.safetensors`), in sorted path order.
    """
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:10]


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash ("AutoV3"): the first 12 hex digits of the sha256 of a safetensors file minus its header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_size)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _number(x: float) -> str:
    """7.0 -> "7", 0.75 -> "0.75" (shortest text that reads back as the same float)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _quote(text: str) -> str:
    """A1111's quoting of a settings value."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
