"""Training sets rendered from the catalogue: base renders, generic textures for the VAE, judge sets."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .catalog import Composition, caption, labels_of, sample_any, sample_base
from .render import SIZE, render


def generic_texture(rng: random.Random) -> np.ndarray:
    """A generic picture (gratings, blobs, dots, lines, noise) that is no catalogue concept.

    It gives the VAE image statistics beyond the base vocabulary, as a real VAE sees many kinds of image,
    without ever showing it a LoRA concept of the catalogue.
    """
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = [rng.random() for _ in range(3)]
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["grating", "disk", "rect", "dots", "line", "noise"])
        col = np.array([rng.random() for _ in range(3)], np.float32)
        if kind == "grating":
            ang, period = rng.uniform(0, math.pi), rng.uniform(3, 20)
            phase = (x * math.cos(ang) + y * math.sin(ang)) / period
            m = np.mod(phase, 1.0) < rng.uniform(0.2, 0.6)
            region = np.ones_like(m) if rng.random() < 0.5 else (
                (x - rng.uniform(0, SIZE)) ** 2 + (y - rng.uniform(0, SIZE)) ** 2 < rng.uniform(8, 30) ** 2)
            img[m & region] = col
        elif kind == "disk":
            m = (x - rng.uniform(0, SIZE)) ** 2 + (y - rng.uniform(0, SIZE)) ** 2 < rng.uniform(3, 25) ** 2
            img[m] = col
        elif kind == "rect":
            x0, y0 = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
            m = (x >= x0) & (x < x0 + rng.uniform(3, 40)) & (y >= y0) & (y < y0 + rng.uniform(3, 40))
            img[m] = col
        elif kind == "dots":
            for _ in range(rng.randint(5, 40)):
                img[(x - rng.uniform(0, SIZE)) ** 2 + (y - rng.uniform(0, SIZE)) ** 2 < rng.uniform(0.5, 3) ** 2] = col
        elif kind == "line":
            x0, y0, ang = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(0, math.pi)
            d = np.abs((x - x0) * math.sin(ang) - (y - y0) * math.cos(ang))
            img[d < rng.uniform(0.5, 2.5)] = col
        else:
            np_rng = np.random.default_rng(rng.randrange(1 << 30))
            img = img * 0.7 + 0.3 * np_rng.random((SIZE, SIZE, 3), dtype=np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def vae_set(n: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in tqdm(range(n), desc="render vae set", leave=False):
        out[i] = render(sample_base(rng), rng=rng) if i % 2 == 0 else generic_texture(rng)
    return out


def base_set(n: int, seed: int) -> tuple[np.ndarray, list[Composition]]:
    """Base-vocabulary renders with their compositions (captions are drawn fresh every epoch)."""
    rng = random.Random(seed)
    comps = [sample_base(rng) for _ in range(n)]
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, c in enumerate(tqdm(comps, desc="render base set", leave=False)):
        imgs[i] = render(c, rng=rng)
    return imgs, comps


def judge_set(n: int, seed: int, p_concept: float = 0.5) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = random.Random(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels: dict[str, list[int]] = {}
    for i in tqdm(range(n), desc="render judge set", leave=False):
        comp = sample_any(rng, p_concept)
        imgs[i] = render(comp, rng=rng)
        for k, v in labels_of(comp).items():
            labels.setdefault(k, []).append(v)
    return imgs, {k: np.asarray(v, np.int64) for k, v in labels.items()}


def cached(path: Path, make):
    """np.savez cache for rendered sets, so a resumed run does not render again."""
    path = Path(path)
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    data = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def captions_for(comps: list[Composition], rng: random.Random) -> list[str]:
    return [caption(c, rng) for c in comps]
