"""Optional: the app in a real headless Chromium (`docs/make_screenshot.py`): type a prompt, pick LoRAs, select a
fusion method, generate, and wait for the gallery. Skipped without Playwright or a Chromium executable."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
pytest.importorskip("playwright")
import make_screenshot  # noqa: E402

CHROMIUM = make_screenshot.find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable (chromium / chromium-browser / $CHROMIUM)")
def test_generate_in_a_headless_browser(tmp_path):
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    png = make_screenshot.make_screenshot(tmp_path / "shot.png", chromium=CHROMIUM, n=2, steps=4,
                                          timeout_s=120)
    with Image.open(png) as im:
        assert im.width >= 1200 and im.height >= 1000
        colors = im.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert colors is not None and len(colors) > 50  # a rendered page, not a blank one
