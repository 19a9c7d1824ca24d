"""Make docs/report.png: the top of a real report, as headless Chromium shows it.

Trains the demo into a temporary MAPS (or uses ``--maps DIR``), writes its report, takes a
screenshot with Chromium and keeps a small, palette PNG of its upper part (header, training
loss, validation metrics). Needs chromium on PATH and trainbus installed with matplotlib.

    python docs/make_screenshot.py [--maps DIR] [--epochs 8] [--output docs/report.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from trainbus.cli import main as trainbus

WINDOW = (1100, 1500)  # CSS pixels: the header, the training loss and the validation panels
WIDTH = 760  # pixels of the PNG kept
COLOURS = 64  # a palette keeps the file small: the page is flat colours and lines


def screenshot(page: Path, target: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                f"--screenshot={target}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def shrink(source: Path, target: Path) -> None:
    with Image.open(source) as image:
        height = round(image.height * WIDTH / image.width)
        small = image.convert("RGB").resize((WIDTH, height), Image.Resampling.LANCZOS)
        small.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=Path, default=None, help="an existing MAPS to show")
    parser.add_argument("--epochs", type=int, default=8, help="demo epochs when training")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("report.png"))
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        maps = arguments.maps
        if maps is None:
            maps = Path(scratch) / "digits"
            trainbus(["demo", "--maps", str(maps), "--epochs", str(arguments.epochs)])
        page = Path(scratch) / "report.html"
        if trainbus(["report", str(maps), "-o", str(page)]) != 0:
            return 2
        raw = Path(scratch) / "raw.png"
        screenshot(page, raw)
        shrink(raw, arguments.output)
    print(f"wrote {arguments.output} ({arguments.output.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
