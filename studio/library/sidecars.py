"""Files beside a LoRA: Civitai ``NAME.civitai.info``, A1111 ``NAME.json`` and preview images.

Also where trigger words, description and tags come from: the file's metadata plus these sidecars.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.jpeg", ".jpeg", ".preview.webp", ".webp")
_CIVITAI_KEEP = ("id", "modelId", "name", "baseModel", "trainedWords", "description", "downloadUrl")
_CIVITAI_FAMILIES = {"SD 1.5": "sd15", "SD 1.4": "sd15", "SDXL 1.0": "sdxl", "SDXL 0.9": "sdxl", "Pony": "sdxl",
                     "Illustrious": "sdxl", "NoobAI": "sdxl"}
_A1111_FAMILIES = {"SD1": "sd15", "SDXL": "sdxl"}


@dataclass
class Sidecars:
    """Parsed sidecars of one LoRA file (only the parts LoRA Studio uses)."""

    civitai: dict = field(default_factory=dict)
    a1111: dict = field(default_factory=dict)
    preview: Path | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in (("civitai", self.civitai), ("a1111", self.a1111)) if v}


def _read_json(path: Path, warnings: list[str]) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        warnings.append(f"ignored {path.name}: {type(e).__name__}")
        return {}
    if not isinstance(value, dict):
        warnings.append(f"ignored {path.name}: not a JSON object")
        return {}
    return value


def find_sidecars(path: str | Path) -> Sidecars:
    path = Path(path)
    base = path.with_suffix("")
    found = Sidecars()
    info = base.with_name(base.name + ".civitai.info")
    if info.is_file():
        found.files.append(info)
        raw = _read_json(info, found.warnings)
        found.civitai = {k: raw[k] for k in _CIVITAI_KEEP if k in raw}
        model = raw.get("model")
        if isinstance(model, dict):
            found.civitai["model"] = {k: model[k] for k in ("name", "type", "description", "tags") if k in model}
    a1111 = base.with_name(base.name + ".json")
    if a1111.is_file():
        found.files.append(a1111)
        found.a1111 = _read_json(a1111, found.warnings)
    for suffix in PREVIEW_SUFFIXES:
        preview = base.with_name(base.name + suffix)
        if preview.is_file():
            found.files.append(preview)
            found.preview = preview
            break
    return found


def _split(text) -> list[str]:
    if isinstance(text, str):
        return [t.strip() for t in text.split(",") if t.strip()]
    if isinstance(text, list):
        return [t for item in text for t in _split(item)]
    return []


def _unique(words) -> list[str]:
    seen, out = set(), []
    for w in words:
        if w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out


STOPWORDS = frozenset(
    "a an the and or of on in at to with without for from by over under beside near its it this that one two "
    "image picture photo drawing illustration art background backdrop plain".split())


def activation_tags(metadata: Mapping[str, str], share: float = 0.9) -> list[str]:
    """Training tags present in (nearly) every caption: kohya's convention for the activation tag. Tags at
    >= `share` of the most frequent tag's count, stopwords and generic picture words removed; a tag that only
    a part of the captions carry ("white", "backdrop") describes the data, not the trigger."""
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except (json.JSONDecodeError, RecursionError):
        return []
    out = []
    for tags in freq.values() if isinstance(freq, dict) else []:
        if not isinstance(tags, dict):
            continue
        counts = {t.strip(): c for t, c in tags.items() if isinstance(c, int) and c > 0 and t.strip()}
        if counts:
            top = max(counts.values())
            out += [t for t, c in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))
                    if c >= share * top and t.lower() not in STOPWORDS]
    return out


def trigger_words(metadata: Mapping[str, str], sidecars: Sidecars | None = None) -> list[str]:
    """modelspec.trigger_phrase, Civitai trainedWords, A1111 activation text, then the training tags that
    (nearly) every caption carries; never filler words."""
    sidecars = sidecars or Sidecars()
    words = _split(metadata.get("modelspec.trigger_phrase", ""))
    words += _split(sidecars.civitai.get("trainedWords", []))
    words += _split(sidecars.a1111.get("activation text", ""))
    return _unique(words + activation_tags(metadata))


def _strip_html(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()


def description(metadata: Mapping[str, str], sidecars: Sidecars) -> str:
    model = sidecars.civitai.get("model") or {}
    for text in (sidecars.a1111.get("description"), model.get("description"), sidecars.civitai.get("description"),
                 metadata.get("modelspec.description")):
        if isinstance(text, str) and text.strip():
            return _strip_html(text)
    return ""


def tags(metadata: Mapping[str, str], sidecars: Sidecars) -> list[str]:
    model = sidecars.civitai.get("model") or {}
    found = [t.get("name", "") if isinstance(t, dict) else t for t in model.get("tags") or []]
    found = [t.strip() for t in found if isinstance(t, str) and t.strip()]
    return _unique(found + _split(metadata.get("modelspec.tags", "")))


def family_hint(sidecars: Sidecars) -> str | None:
    """Base family that the sidecars state (Civitai ``baseModel``, A1111 ``sd version``), if any."""
    civitai = _CIVITAI_FAMILIES.get(sidecars.civitai.get("baseModel"))
    return civitai or _A1111_FAMILIES.get(sidecars.a1111.get("sd version"))


def alias(metadata: Mapping[str, str], sidecars: Sidecars) -> str | None:
    """A second name: kohya's ``ss_output_name``, ``modelspec.title`` or the Civitai model name."""
    model = sidecars.civitai.get("model") or {}
    for name in (metadata.get("ss_output_name"), metadata.get("modelspec.title"), model.get("name")):
        if isinstance(name, str) and name.strip():
            return name.strip()
    return None
