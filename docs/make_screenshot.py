"""Screenshot of the Generate tab: launch the app, type a prompt, pick LoRAs, generate, wait for the gallery.

    python docs/make_screenshot.py [--out docs/ui_generate.png] [--library DIR] [--chromium PATH]

Needs Playwright (``pip install playwright``) and a Chromium executable (``--chromium``, else ``$CHROMIUM``, else
``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH); Playwright's own browser download is not needed.
Without ``--library`` the app runs TinyWorld on a small synthetic library written to a temporary folder (so the
LoRA table is filled), on CPU, and generated images go to a temporary folder too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a round alien creature wearing a hat, striped style"


def find_chromium(given: str | None = None) -> str | None:
    for candidate in (given, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate:
            found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
            if found:
                return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_screenshot(png: str | Path, library: str | Path | None = None, chromium: str | None = None,
                    prompt: str = PROMPT, method: str | None = "switch", n: int = 4, steps: int | None = None,
                    timeout_s: float = 300) -> Path:
    """Save a full-page screenshot of the Generate tab after generating `n` images (`steps`: None keeps the
    UI's default) with `method` selected; returns the PNG path."""
    from playwright.sync_api import sync_playwright

    import app as appmod

    executable = find_chromium(chromium)
    if executable is None:
        raise SystemExit("no Chromium found: pass --chromium PATH (or set $CHROMIUM)")
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory(prefix="studio-shot-") as tmp:
        if library is None:
            from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library

            library = Path(tmp) / "lib"
            write_synthetic_library(library, ["zorbo", "hat", "stripes", "crown", "sunset"], ranks=(4,),
                                    seeds=(0,), shapes=SMALL_TARGETS, name_style="concept")
        studio_app = appmod.StudioApp(library=library, out=Path(tmp) / "out", device="cpu")
        studio_app.warm_up()
        demo = studio_app.launch(port=free_port(), quiet=True, prevent_thread_lock=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=executable, headless=True,
                                            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                page = browser.new_page(viewport={"width": 1440, "height": 1100}, device_scale_factor=1)
                page.set_default_timeout(timeout_s * 1000)
                page.goto(demo.local_url, wait_until="networkidle")
                box = page.locator("#prompt textarea")
                box.fill(prompt)
                page.locator("#pick").click()  # retrieval fills the LoRA table and adds trigger words
                page.wait_for_function(
                    "() => document.querySelectorAll('#loras tbody tr').length > 0 && "
                    "!document.querySelector('#loras tbody').innerText.includes('Loading')")
                for elem, value in (("images", n), ("steps", steps)):
                    if value is not None:
                        field = page.locator(f"#{elem} input[type=number]")
                        field.fill(str(value))
                        field.press("Enter")
                if method:
                    page.locator("#method input").click()
                    page.get_by_role("option", name=method, exact=True).click()
                page.wait_for_timeout(500)
                page.locator("#generate").click()
                page.wait_for_function(
                    f"() => document.querySelectorAll('#gallery img').length >= {n} && "
                    "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)")
                page.wait_for_function("() => document.querySelector('#status').innerText.includes('image(s)')")
                page.wait_for_timeout(1500)  # the heatmap and recipes render after the gallery
                png.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(png), full_page=True)
                browser.close()
        finally:
            demo.close()
            studio_app.close()
    return png


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "ui_generate.png"))
    ap.add_argument("--library", default=None, help="LoRA folder (default: a synthetic library in a temp folder)")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM, then PATH)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--n", type=int, default=4, help="images (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the UI's, 25)")
    ap.add_argument("--method", default="switch", help="fusion method to select (default switch: its heatmap "
                                                          "shows the LoRAs taking turns)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    path = make_screenshot(args.out, args.library, args.chromium, args.prompt, args.method, args.n, args.steps)
    print(f"{path} ({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
