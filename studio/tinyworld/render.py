"""Procedural renderer for TinyWorld: draws any Composition as a 64x64 RGB image.

Drawing happens on a 2x supersampled canvas (128x128) and is box-filtered down, so edges are
anti-aliased. Layers, back to front: background, object, subject (shape or character sprite) with its
style, clothing, then whole-image styles (mosaic).
"""
from __future__ import annotations

import math
import random

import numpy as np

from .catalog import BACKGROUNDS, COLORS, POSITIONS, SIZES, Composition

SIZE = 64
SS = 2  # supersampling factor
N = SIZE * SS
_Y, _X = np.mgrid[0:N, 0:N].astype(np.float32) + 0.5


def _c(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) / 255.0


# ------------------------------------------------------------------ primitive masks (canvas coordinates)
def disk(cx, cy, r):
    return (_X - cx) ** 2 + (_Y - cy) ** 2 <= r * r


def ellipse(cx, cy, rx, ry):
    return ((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2 <= 1.0


def rect(x0, y0, x1, y1):
    return (_X >= x0) & (_X <= x1) & (_Y >= y0) & (_Y <= y1)


def segment(x0, y0, x1, y1, w):
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-6
    t = np.clip(((_X - x0) * dx + (_Y - y0) * dy) / L2, 0.0, 1.0)
    px, py = x0 + t * dx, y0 + t * dy
    return (_X - px) ** 2 + (_Y - py) ** 2 <= (w / 2) ** 2


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _X - cx, _Y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.82 * r) & (np.abs(dy) <= 0.82 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.08 * r
    if shape == "triangle":
        return (dy <= 0.62 * r) & (np.abs(dx) <= (dy + r) * 0.577)
    if shape == "cross":
        a = 0.36 * r
        return ((np.abs(dx) <= a) & (np.abs(dy) <= r)) | ((np.abs(dy) <= a) & (np.abs(dx) <= r))
    if shape == "star":
        theta = np.arctan2(dy, dx) + math.pi / 2
        k = np.mod(theta, 2 * math.pi / 5) / (2 * math.pi / 5)
        inner = 0.42 * r
        lim = inner + (r * 1.08 - inner) * np.abs(1 - 2 * k) ** 1.6
        return np.sqrt(dx * dx + dy * dy) <= lim
    raise ValueError(f"unknown shape {shape!r}")


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(k):
        m = out
        out = m.copy()
        out[1:, :] &= m[:-1, :]
        out[:-1, :] &= m[1:, :]
        out[:, 1:] &= m[:, :-1]
        out[:, :-1] &= m[:, 1:]
    return out


# ------------------------------------------------------------------ the subject layer
class Layer:
    """An RGB layer with coverage; `body` marks the pixels painted in the subject's own colour."""

    def __init__(self):
        self.rgb = np.zeros((N, N, 3), np.float32)
        self.mask = np.zeros((N, N), bool)
        self.body = np.zeros((N, N), bool)

    def paint(self, m, rgb, body=False):
        self.rgb[m] = rgb
        self.mask |= m
        if body:
            self.body |= m
        else:
            self.body &= ~m


def _shade(rgb, f):
    return np.clip(rgb * f, 0, 1)


def draw_subject(layer: Layer, subject: str, cx, cy, r, col) -> dict:
    """Draw a shape or character sprite; returns anchor points used for clothing."""
    dark = _c((20, 20, 25))
    white = _c((250, 250, 250))
    anchors = {"top": (cx, cy - r), "eyes": (cx, cy - 0.25 * r), "neck": (cx, cy + 0.35 * r), "w": r}
    if subject in ("circle", "square", "triangle", "star", "diamond", "cross"):
        layer.paint(shape_mask(subject, cx, cy, r), col, body=True)
        if subject == "triangle":
            anchors["top"] = (cx, cy - 0.9 * r)
            anchors["w"] = 0.7 * r
            anchors["eyes"] = (cx, cy + 0.05 * r)
        if subject in ("star", "diamond", "cross"):
            anchors["w"] = 0.8 * r
        return anchors
    if subject == "zorbo":  # round alien with antennae
        for s in (-1, 1):
            layer.paint(segment(cx + s * 0.3 * r, cy - 0.6 * r, cx + s * 0.6 * r, cy - 1.15 * r, 0.14 * r), col,
                        body=True)
            layer.paint(disk(cx + s * 0.6 * r, cy - 1.15 * r, 0.16 * r), col, body=True)
        layer.paint(disk(cx, cy + 0.1 * r, 0.78 * r), col, body=True)
        for s in (-1, 1):
            layer.paint(disk(cx + s * 0.3 * r, cy - 0.05 * r, 0.24 * r), white)
            layer.paint(disk(cx + s * 0.3 * r, cy - 0.02 * r, 0.11 * r), dark)
        anchors.update(top=(cx, cy - 0.68 * r), eyes=(cx, cy - 0.05 * r), neck=(cx, cy + 0.5 * r), w=0.75 * r)
        return anchors
    if subject == "glimmet":  # ghost with wavy hem
        top = disk(cx, cy - 0.2 * r, 0.7 * r) & (_Y <= cy - 0.2 * r)
        hem = cy + 0.75 * r + 0.12 * r * np.sin((_X - cx) / (0.16 * r))
        body = rect(cx - 0.7 * r, cy - 0.2 * r, cx + 0.7 * r, cy + r) & (_Y <= hem)
        layer.paint(top | body, col, body=True)
        for s in (-1, 1):
            layer.paint(ellipse(cx + s * 0.27 * r, cy - 0.2 * r, 0.12 * r, 0.2 * r), dark)
        anchors.update(top=(cx, cy - 0.9 * r), eyes=(cx, cy - 0.2 * r), neck=(cx, cy + 0.25 * r), w=0.7 * r)
        return anchors
    if subject == "botzy":  # robot
        layer.paint(segment(cx, cy - 0.95 * r, cx, cy - 0.6 * r, 0.1 * r), dark)
        layer.paint(disk(cx, cy - 1.0 * r, 0.12 * r), _c((230, 40, 40)))
        layer.paint(rect(cx - 0.45 * r, cy - 0.62 * r, cx + 0.45 * r, cy - 0.02 * r), col, body=True)
        layer.paint(rect(cx - 0.7 * r, cy + 0.05 * r, cx + 0.7 * r, cy + 0.95 * r), col, body=True)
        layer.paint(rect(cx - 0.3 * r, cy - 0.45 * r, cx - 0.1 * r, cy - 0.28 * r), _c((255, 255, 120)))
        layer.paint(rect(cx + 0.1 * r, cy - 0.45 * r, cx + 0.3 * r, cy - 0.28 * r), _c((255, 255, 120)))
        layer.paint(rect(cx - 0.35 * r, cy + 0.3 * r, cx + 0.35 * r, cy + 0.45 * r), dark)
        anchors.update(top=(cx, cy - 0.62 * r), eyes=(cx, cy - 0.36 * r), neck=(cx, cy + 0.02 * r), w=0.5 * r)
        return anchors
    if subject == "kittox":  # cat face
        for s in (-1, 1):
            ear = (np.abs(_X - (cx + s * 0.5 * r)) <= (_Y - (cy - 1.0 * r)) * 0.55) & (_Y <= cy - 0.3 * r)
            layer.paint(ear, col, body=True)
        layer.paint(ellipse(cx, cy, 0.85 * r, 0.72 * r), col, body=True)
        for s in (-1, 1):
            layer.paint(ellipse(cx + s * 0.32 * r, cy - 0.12 * r, 0.1 * r, 0.16 * r), dark)
            for dyw in (-0.05, 0.12):
                layer.paint(segment(cx + s * 0.25 * r, cy + 0.2 * r, cx + s * 1.05 * r, cy + (0.1 + dyw) * r,
                                    0.06 * r), white)
        layer.paint(disk(cx, cy + 0.12 * r, 0.08 * r), _c((240, 120, 150)))
        anchors.update(top=(cx, cy - 0.7 * r), eyes=(cx, cy - 0.12 * r), neck=(cx, cy + 0.7 * r), w=0.7 * r)
        return anchors
    if subject == "snarvel":  # snail
        layer.paint(ellipse(cx - 0.05 * r, cy + 0.6 * r, 0.95 * r, 0.25 * r), _c((210, 190, 150)))
        for s in (0.55, 0.8):
            layer.paint(segment(cx + s * r, cy + 0.5 * r, cx + (s + 0.1) * r, cy - 0.15 * r, 0.07 * r),
                        _c((210, 190, 150)))
            layer.paint(disk(cx + (s + 0.1) * r, cy - 0.15 * r, 0.09 * r), dark)
        layer.paint(disk(cx - 0.15 * r, cy - 0.05 * r, 0.62 * r), col, body=True)
        ang = np.arctan2(_Y - (cy - 0.05 * r), _X - (cx - 0.15 * r))
        rad = np.sqrt((_X - (cx - 0.15 * r)) ** 2 + (_Y - (cy - 0.05 * r)) ** 2)
        spiral = np.abs(np.mod(rad / (0.62 * r) * 3.0 - ang / (2 * math.pi), 1.0) - 0.5) < 0.09
        layer.paint(spiral & (rad < 0.58 * r), _shade(col, 0.45))
        anchors.update(top=(cx - 0.15 * r, cy - 0.67 * r), eyes=(cx + 0.7 * r, cy - 0.15 * r),
                       neck=(cx + 0.6 * r, cy + 0.35 * r), w=0.5 * r)
        return anchors
    if subject == "fungle":  # mushroom
        layer.paint(rect(cx - 0.28 * r, cy - 0.1 * r, cx + 0.28 * r, cy + 0.95 * r), _c((235, 225, 200)))
        cap = ellipse(cx, cy - 0.1 * r, 0.95 * r, 0.8 * r) & (_Y <= cy + 0.05 * r)
        layer.paint(cap, col, body=True)
        for s in (-1, 1):
            layer.paint(disk(cx + s * 0.12 * r, cy + 0.3 * r, 0.06 * r), dark)
        anchors.update(top=(cx, cy - 0.9 * r), eyes=(cx, cy + 0.3 * r), neck=(cx, cy + 0.55 * r), w=0.55 * r)
        return anchors
    raise ValueError(f"unknown subject {subject!r}")


def draw_clothing(layer: Layer, clothing: str, a: dict) -> None:
    tx, ty = a["top"]
    w = a["w"]
    if clothing == "hat":
        black, band = _c((25, 25, 30)), _c((200, 30, 40))
        layer.paint(rect(tx - 0.75 * w, ty - 0.12 * w, tx + 0.75 * w, ty + 0.06 * w), black)
        layer.paint(rect(tx - 0.45 * w, ty - 0.95 * w, tx + 0.45 * w, ty - 0.1 * w), black)
        layer.paint(rect(tx - 0.45 * w, ty - 0.3 * w, tx + 0.45 * w, ty - 0.14 * w), band)
    elif clothing == "crown":
        gold = _c((250, 200, 30))
        base = rect(tx - 0.6 * w, ty - 0.2 * w, tx + 0.6 * w, ty + 0.05 * w)
        spikes = np.zeros_like(base)
        for k in (-1, 0, 1):
            px = tx + k * 0.45 * w
            spikes |= (np.abs(_X - px) <= (_Y - (ty - 0.75 * w)) * 0.35) & (_Y <= ty - 0.15 * w)
        layer.paint(base | spikes, gold)
        layer.paint(disk(tx, ty - 0.08 * w, 0.09 * w), _c((220, 30, 60)))
    elif clothing == "glasses":
        ex, ey = a["eyes"]
        black = _c((15, 15, 20))
        for s in (-1, 1):
            layer.paint(disk(ex + s * 0.33 * w, ey, 0.27 * w), black)
        layer.paint(segment(ex - 0.33 * w, ey - 0.05 * w, ex + 0.33 * w, ey - 0.05 * w, 0.09 * w), black)
    elif clothing == "scarf":
        nx, ny = a["neck"]
        wool = _c((230, 230, 235))
        red = _c((200, 40, 40))
        layer.paint(rect(nx - 0.85 * w, ny - 0.13 * w, nx + 0.85 * w, ny + 0.13 * w), wool)
        layer.paint(rect(nx + 0.25 * w, ny, nx + 0.55 * w, ny + 0.75 * w), wool)
        layer.paint(rect(nx + 0.25 * w, ny + 0.6 * w, nx + 0.55 * w, ny + 0.75 * w), red)
        layer.paint(rect(nx - 0.85 * w, ny - 0.03 * w, nx + 0.85 * w, ny + 0.03 * w), red)
    else:
        raise ValueError(f"unknown clothing {clothing!r}")


def draw_object(layer: Layer, obj: str, cx, cy, r) -> None:
    if obj == "ball":
        layer.paint(disk(cx, cy, r), _c((245, 245, 245)))
        layer.paint(disk(cx, cy, r) & (np.abs(_X - cx) < 0.3 * r), _c((230, 40, 40)))
        layer.paint(disk(cx, cy, r) & (_X - cx > 0.6 * r), _c((40, 90, 230)))
        layer.paint(disk(cx, cy, r) & (_X - cx < -0.6 * r), _c((40, 90, 230)))
    elif obj == "tree":
        layer.paint(rect(cx - 0.18 * r, cy, cx + 0.18 * r, cy + 1.1 * r), _c((120, 75, 30)))
        layer.paint(disk(cx, cy - 0.3 * r, 0.75 * r) | disk(cx - 0.45 * r, cy + 0.1 * r, 0.5 * r)
                    | disk(cx + 0.45 * r, cy + 0.1 * r, 0.5 * r), _c((30, 140, 50)))
    elif obj == "key":
        gold = _c((240, 195, 40))
        layer.paint(disk(cx, cy - 0.55 * r, 0.45 * r) & ~disk(cx, cy - 0.55 * r, 0.2 * r), gold)
        layer.paint(rect(cx - 0.1 * r, cy - 0.15 * r, cx + 0.1 * r, cy + 1.0 * r), gold)
        layer.paint(rect(cx, cy + 0.55 * r, cx + 0.4 * r, cy + 0.68 * r), gold)
        layer.paint(rect(cx, cy + 0.82 * r, cx + 0.3 * r, cy + 0.95 * r), gold)
    elif obj == "cup":
        mug = _c((235, 235, 240))
        layer.paint(disk(cx + 0.6 * r, cy + 0.25 * r, 0.35 * r) & ~disk(cx + 0.6 * r, cy + 0.25 * r, 0.18 * r),
                    mug)
        layer.paint(rect(cx - 0.6 * r, cy - 0.3 * r, cx + 0.6 * r, cy + 0.85 * r), mug)
        layer.paint(rect(cx - 0.6 * r, cy - 0.3 * r, cx + 0.6 * r, cy - 0.15 * r), _c((120, 70, 40)))
        for s in (-0.3, 0.2):
            layer.paint(segment(cx + s * r, cy - 0.5 * r, cx + (s + 0.15) * r, cy - 1.0 * r, 0.08 * r),
                        _c((200, 200, 210)))
    else:
        raise ValueError(f"unknown object {obj!r}")


# ------------------------------------------------------------------ backgrounds
def draw_background(name: str, rng: random.Random) -> np.ndarray:
    img = np.zeros((N, N, 3), np.float32)
    if name in BACKGROUNDS:
        img[:] = _c(BACKGROUNDS[name])
        return img
    if name == "checker":
        s = 16
        ox, oy = rng.randrange(s), rng.randrange(s)
        m = ((((_X + ox) // s) + ((_Y + oy) // s)) % 2).astype(bool)
        img[:] = _c((215, 215, 215))
        img[m] = _c((70, 70, 80))
    elif name == "grid":
        s = 24
        ox, oy = rng.randrange(s), rng.randrange(s)
        img[:] = _c((20, 40, 110))
        m = (np.mod(_X + ox, s) < 4) | (np.mod(_Y + oy, s) < 4)
        img[m] = _c((150, 200, 255))
    elif name == "starfield":
        img[:] = _c((8, 10, 35))
        for _ in range(rng.randint(16, 24)):
            x, y = rng.uniform(0, N), rng.uniform(0, N)
            img[disk(x, y, rng.choice([2.6, 3.2, 3.8]))] = _c((255, 255, 230))
    elif name == "sunset":
        t = (_Y / N)[..., None]
        top, bottom = _c((90, 30, 140)), _c((255, 150, 40))
        img[:] = top * (1 - t) + bottom * t
        img[disk(rng.uniform(40, 88), N + 4, 26)] = _c((255, 230, 90))
    elif name == "waves":
        img[:] = _c((20, 90, 170))
        ph = rng.uniform(0, 2 * math.pi)
        crest = np.mod(_Y + 5 * np.sin(_X / 10.0 + ph), 20) < 5.5
        img[crest] = _c((150, 210, 245))
    elif name == "brick":
        img[:] = _c((175, 60, 40))
        bh, bw = 14, 28
        oy = rng.randrange(bh)
        row = ((_Y + oy) // bh).astype(int)
        mortar = (np.mod(_Y + oy, bh) < 3.5) | (np.mod(_X + (row % 2) * bw / 2, bw) < 3.5)
        img[mortar] = _c((215, 205, 190))
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


# ------------------------------------------------------------------ styles
def _stylize_subject(layer: Layer, style: str, bg: np.ndarray) -> None:
    if style == "stripes":
        m = layer.body & (np.mod(_X + _Y, 24) < 11)
        layer.rgb[m] = _shade(layer.rgb[m], 0.4)
    elif style == "polka":
        dots = (np.mod(_X, 22) - 11) ** 2 + (np.mod(_Y + 11 * (np.floor_divide(_X, 22) % 2), 22) - 11) ** 2 <= 30
        layer.rgb[layer.body & dots] = _c((250, 250, 250))
    elif style == "hatching":
        m = layer.mask & ((np.mod(_X + _Y, 22) < 5.5) | (np.mod(_X - _Y, 22) < 5.5))
        layer.rgb[m] = _c((25, 20, 20))
    elif style == "outline":
        inner = erode(layer.body, 6)
        layer.rgb[inner] = bg[inner]
    elif style == "pastel":
        layer.rgb[layer.mask] = 0.42 * layer.rgb[layer.mask] + 0.58 * _c((255, 250, 245))
    elif style == "mosaic":
        pass  # whole image, after compositing
    else:
        raise ValueError(f"unknown style {style!r}")


def _downsample(img: np.ndarray) -> np.ndarray:
    return img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))


def render(comp: Composition, seed: int | None = None, rng: random.Random | None = None) -> np.ndarray:
    """Render a composition to a uint8 (64, 64, 3) array. Same seed, same picture."""
    rng = rng or random.Random(seed)
    r = SIZES[comp.size] * SS * rng.uniform(0.92, 1.08)
    px, py = POSITIONS[comp.position]
    cx = (px + rng.uniform(-2, 2)) * SS
    cy = (py + rng.uniform(-2, 2)) * SS
    jitter = np.array([rng.uniform(-0.04, 0.04) for _ in range(3)], np.float32)
    col = np.clip(_c(COLORS[comp.color]) + jitter, 0, 1)

    bg = draw_background(comp.background, rng)
    layer = Layer()
    if comp.object:
        ro = 8.5 * SS
        side = 1 if px <= 32 else -1
        ox = np.clip(cx + side * (r + ro * 1.1), ro, N - ro)
        oy = np.clip(cy + 0.3 * r, ro * 1.2, N - ro * 1.2)
        draw_object(layer, comp.object, ox, oy, ro)
        if comp.style == "pastel":
            layer.rgb[layer.mask] = 0.42 * layer.rgb[layer.mask] + 0.58 * _c((255, 250, 245))
    subj = Layer()
    anchors = draw_subject(subj, comp.subject, cx, cy, r, col)
    if comp.clothing:
        draw_clothing(subj, comp.clothing, anchors)
    if comp.style and comp.style != "mosaic":
        _stylize_subject(subj, comp.style, bg)
    img = bg
    img[layer.mask] = layer.rgb[layer.mask]
    img[subj.mask] = subj.rgb[subj.mask]
    out = _downsample(img)
    if comp.style == "mosaic":
        b = 4
        blocks = out.reshape(SIZE // b, b, SIZE // b, b, 3).mean(axis=(1, 3))
        out = np.repeat(np.repeat(blocks, b, axis=0), b, axis=1)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_grid(images: list[np.ndarray], cols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 images into one grid image (for sample sheets)."""
    n = len(images)
    rows = (n + cols - 1) // cols
    h, w = images[0].shape[:2]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        rr, cc = divmod(i, cols)
        grid[pad + rr * (h + pad): pad + rr * (h + pad) + h, pad + cc * (w + pad): pad + cc * (w + pad) + w] = im
    return grid
