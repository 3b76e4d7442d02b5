"""Command line: a thin click layer over extract/ and pipeline/ (no logic of its own)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from pipeline.training.defaults import FIT_UP_SCHEDULE, FIT_UP_TEMPERATURE, SELECTIONS
from stores import DTYPES, OneEncoderError


class StoreParam(click.ParamType):
    """A feature store: a local directory (which must exist unless ``new``) or an fsspec URL (``s3://b/x``, ...)."""

    name = "store"

    def __init__(self, new: bool = False):
        self.new = new

    def convert(self, value, param, ctx):
        from stores import is_url

        if isinstance(value, Path) or not is_url(str(value)):
            path = Path(str(value).removeprefix("file://"))
            if not self.new and not path.is_dir():
                self.fail(f"directory '{value}' does not exist", param, ctx)
            return path
        return str(value)


STORE = StoreParam()


class Commands(click.Group):
    """The command tree. A project error (:class:`~stores.errors.OneEncoderError`: a bad manifest, a mismatched
    store, a missing encoder, ...) raised anywhere below becomes one line and exit status 1, never a traceback."""

    group_class = type  # subgroups (manifest, eval, stores) are Commands too

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OneEncoderError as err:
            raise click.ClickException(str(err)) from err


def _resolve_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from pipeline.training.distributed import resolve_device

    return resolve_device(value)


# Options several commands share, declared once.
device_option = click.option("--device", default="auto", show_default=True, callback=_resolve_device,
                             help="auto (cuda when present), cpu, cuda or cuda:N")
sampling_option = click.option("--sampling", type=click.Choice(["one-per-anchor", "all"]), default="one-per-anchor",
                               show_default=True, help="one random caption per image per epoch, or every pair")
RUN_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def run_option(*aliases: str, required: bool = True, help: str | None = None):
    """``--run`` (a trained run's directory, plus ``aliases``), passed to the command as ``run_dir``."""
    return click.option("--run", *aliases, "run_dir", type=RUN_DIR, required=required, default=None, help=help)


def _apply(options: list):
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def optimiser_options(epochs: int, batch_size: int, weight_decay: float = 1e-3, lr_help: str | None = None):
    """--epochs, --batch-size, --lr, --weight-decay, --seed: every command that trains has them (defaults differ)."""
    return _apply([
        click.option("--epochs", default=epochs, show_default=True),
        click.option("--batch-size", default=batch_size, show_default=True),
        click.option("--lr", default=1e-3, show_default=True, help=lr_help),
        click.option("--weight-decay", default=weight_decay, show_default=True),
        click.option("--seed", default=0, show_default=True),
    ])


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pipeline.tools.doctor import versions

    found = versions()
    deps = ", ".join(f"{name} {version or 'not installed'}" for name, version in found.items()
                     if name != "oneencoder-cache")
    click.echo(f"oneencoder-cache {found['oneencoder-cache'] or '(not installed)'} ({deps})")
    ctx.exit()


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="the project's version and its dependencies' (from their metadata), then exit")
@click.option("-q", "--quiet", is_flag=True, help="only warnings and errors on stderr: no progress, no summaries")
@click.option("-v", "--verbose", count=True, help="debug messages too, each with its time and logger")
def main(quiet: bool, verbose: int) -> None:
    """Align modalities with frozen encoders: extract features once, train projection heads from the cache.

    Progress is a bar on a terminal and a log line every ONEENCODER_PROGRESS_SECONDS (30) elsewhere."""
    from extract.progress import configure_logging

    configure_logging(-1 if quiet else verbose)


# ---- extract -----------------------------------------------------------------------------------------------------
@main.command()
@click.option("--modality", type=click.Choice(["image", "text", "audio", "video"]), required=True)
@click.option("--encoder", "encoder_spec", required=True,
              help="transformers model id or local directory, or MODULE:CALLABLE for a plugin encoder")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSONL manifest of the items (or --inputs)")
@click.option("--inputs", multiple=True, metavar="SOURCE",
              help="instead of --manifest: WebDataset shards (*.tar, URLs), a save_to_disk folder, a .parquet file, "
                   "media files ('videos/*.mp4') or @LIST.txt; repeatable")
@click.option("--path-column", default=None, help="--inputs: table column or shard member (jpg) holding the media")
@click.option("--text-column", default=None, help="--inputs: table column or shard member (txt) holding the text")
@click.option("--id-column", default=None, help="--inputs: table column holding item ids (default: the row number)")
@click.option("--inputs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--inputs: folder for the equivalent manifest and unpacked media (default: the user cache)")
@click.option("--store", required=True, help="output store directory; '{key}' in it is replaced by the cache key")
@click.option("--batch-size", default=32, show_default=True)
@device_option
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp16", show_default=True, help="stored dtype")
@click.option("--keep", type=click.Choice(["tokens", "pooled"]), default="tokens", show_default=True)
@click.option("--pool", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="how --keep pooled reduces tokens: masked mean or token 0")
@click.option("--layer", default=-1, show_default=True, help="-1: the model's final output; else hidden_states[N]")
@click.option("--max-tokens", type=int, default=None, help="text truncation (default: the tokenizer's, at most 512)")
@click.option("--workers", default="auto", show_default=True,
              help="DataLoader worker processes that decode and preprocess; auto = half the cores (at most 8) on a CPU, all but one (at most 16) on a GPU")
@click.option("--shard-mb", default=64.0, show_default=True, help="target shard size")
@click.option("--commit-seconds", default=60.0, show_default=True,
              help="make what was encoded since the last shard durable at least this often (a killed run resumes "
                   "from there)")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace a store that was made differently")
@click.option("--sample-rate", default="auto", show_default=True,
              help="audio: Hz to decode at; auto = the encoder's feature extractor rate")
@click.option("--max-seconds", type=float, default=None, help="audio: longest audio given to the encoder")
@click.option("--segment", type=click.Choice(["drop", "split"]), default="drop", show_default=True,
              help="audio past --max-seconds: drop the tail, or split into items ID#segK")
@click.option("--resampler", type=click.Choice(["auto", "torchaudio", "swr"]), default="auto", show_default=True,
              help="audio: auto = torchaudio when a build matching torch loads, else swr (PyAV's libswresample)")
@click.option("--frames", default=16, show_default=True, help="video: frames per clip")
@click.option("--sampling", type=click.Choice(["uniform", "fps"]), default="uniform", show_default=True,
              help="video: frames spread over the whole video, or --fps apart")
@click.option("--fps", type=float, default=None, help="video: sampling rate for --sampling fps")
@click.option("--clips", default=1, show_default=True, help="video: evenly spaced clips, stored as items ID#clipK")
@click.option("--frame-pool", type=click.Choice(["mean", "keep"]), default="mean", show_default=True,
              help="video with an image encoder: mean of frames' tokens, or all frames' tokens concatenated")
@click.option("--max-pixels", type=int, default=None,
              help="image: largest image decoded, in pixels (default 50,000,000); a larger one is an error record")
@click.option("--max-decoded-seconds", type=float, default=None,
              help="audio: longest audio decoded at once (default 3600); a longer one is an error record")
@click.option("--max-video-pixels", type=int, default=None,
              help="video: pixels of every sampled frame of one video together (default 150,000,000)")
def extract(modality, encoder_spec, manifest, inputs, path_column, text_column, id_column, inputs_dir, store,
            batch_size, device, dtype, keep, pool, layer, max_tokens, workers, shard_mb, commit_seconds, on_error,
            overwrite, sample_rate, max_seconds, segment, frames, sampling, fps, clips, frame_pool, resampler,
            max_pixels, max_decoded_seconds, max_video_pixels) -> None:
    """Run a frozen encoder over a manifest (or --inputs) once and cache its tokens in a sharded Zarr v3 store."""
    from extract.run import ExtractionSpec, default_workers, run_spec
    from pipeline.training.distributed import session

    if (manifest is None) == (not inputs):
        raise click.UsageError("give either --manifest or --inputs")
    if inputs:
        from extract.sources import inputs_manifest

        manifest = inputs_manifest(inputs, modality, path_column=path_column, text_column=text_column,
                                   id_column=id_column, inputs_dir=inputs_dir)
        logging.getLogger("extract").info("inputs: equivalent manifest %s", manifest)
    elif path_column or text_column or id_column or inputs_dir:
        raise click.UsageError("--path-column, --text-column, --id-column and --inputs-dir go with --inputs")
    if workers == "auto":
        workers = default_workers(device)
    elif not str(workers).isdigit():
        raise click.BadParameter(f"{workers!r} is not a number of workers or 'auto'", param_hint="--workers")
    # Under torchrun every rank writes part of the one store (docs/store-format.md, "Distributed extraction").
    with session(device, backend="gloo", timeout_minutes=7 * 24 * 60) as device:
        run_spec(ExtractionSpec(
            manifest, modality, encoder_spec, store, batch_size=batch_size, device=device, dtype=dtype, keep=keep,
            pool=pool, layer=layer, max_tokens=max_tokens, workers=int(workers), overwrite=overwrite,
            shard_mb=shard_mb, commit_seconds=commit_seconds, on_error=on_error, progress=True,
            sample_rate=sample_rate, max_seconds=max_seconds, segment=segment, frames=frames, sampling=sampling,
            fps=fps, clips=clips, frame_pool=frame_pool, resampler=resampler, max_pixels=max_pixels,
            max_decoded_seconds=max_decoded_seconds, max_video_pixels=max_video_pixels))


# ---- manifests ---------------------------------------------------------------------------------------------------
@main.group()
def manifest() -> None:
    """Write JSONL manifests from common dataset layouts."""


@manifest.command("coco")
@click.argument("annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--split", default=None, help="split name of the outputs (default: the file name without captions_)")
def manifest_coco(annotations, images, out, split) -> None:
    """COCO captions JSON -> SPLIT.images.jsonl + SPLIT.captions.jsonl (captions 'ref' their image)."""
    from extract.adapters import coco_captions_to_manifests

    for path in coco_captions_to_manifests(annotations, images, out, split=split):
        click.echo(path)


@manifest.command("imagefolder")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def manifest_imagefolder(root, out) -> None:
    """ROOT/<class>/<image> tree -> manifest with 'label' = class folder name."""
    from extract.adapters import image_folder_to_manifest

    click.echo(image_folder_to_manifest(root, out))


# Dataset adapters (docs/datasets.md): each writes one manifest per split into --out and prints the paths.
_SOURCE = click.Path(exists=True, path_type=Path)
_OUT_DIR = click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                        help="folder for the manifests (one per split)")
_TEST_FOLD = click.option("--test-fold", type=int, default=None,
                          help="write train.jsonl (other folds) + test.jsonl instead of one manifest per fold")


@manifest.command("flickr30k")
@click.argument("captions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="the image folder (flickr30k-images)")
@_OUT_DIR
def manifest_flickr30k(captions, images, out) -> None:
    """Karpathy split JSON (dataset_flickr30k.json; also flickr8k/coco) -> SPLIT.images.jsonl + SPLIT.captions.jsonl;
    results_20130124.token or results.csv -> all.images.jsonl + all.captions.jsonl."""
    from extract.adapters import flickr30k_to_manifests

    click.echo("\n".join(flickr30k_to_manifests(captions, images, out)))


@manifest.command("librispeech")
@click.argument("source", type=_SOURCE)
@_OUT_DIR
@click.option("--lowercase", is_flag=True, help="lower-case the (upper-case) transcripts")
def manifest_librispeech(source, out, lowercase) -> None:
    """LibriSpeech folder or subset -> SUBSET.audio.jsonl + SUBSET.transcripts.jsonl (transcripts 'ref' audio)."""
    from extract.adapters import librispeech_to_manifests

    click.echo("\n".join(librispeech_to_manifests(source, out, lowercase=lowercase)))


@manifest.command("esc50")
@click.argument("source", type=_SOURCE)
@_OUT_DIR
@_TEST_FOLD
@click.option("--esc10", is_flag=True, help="only the ESC-10 subset")
def manifest_esc50(source, out, test_fold, esc10) -> None:
    """ESC-50 folder (meta/esc50.csv + audio/) -> foldK.jsonl, label = category."""
    from extract.adapters import esc50_to_manifests

    click.echo("\n".join(esc50_to_manifests(source, out, test_fold=test_fold, esc10=esc10)))


@manifest.command("urbansound8k")
@click.argument("source", type=_SOURCE)
@_OUT_DIR
@_TEST_FOLD
def manifest_urbansound8k(source, out, test_fold) -> None:
    """UrbanSound8K folder (metadata/UrbanSound8K.csv + audio/foldN/) -> foldN.jsonl, label = class."""
    from extract.adapters import urbansound8k_to_manifests

    click.echo("\n".join(urbansound8k_to_manifests(source, out, test_fold=test_fold)))


@manifest.command("gtzan")
@click.argument("source", type=_SOURCE)
@_OUT_DIR
def manifest_gtzan(source, out) -> None:
    """GTZAN genres/<genre>/*.wav -> all.jsonl, label = genre."""
    from extract.adapters import gtzan_to_manifests

    click.echo("\n".join(gtzan_to_manifests(source, out)))


@manifest.command("cifar10")
@click.argument("source", type=_SOURCE)
@_OUT_DIR
def manifest_cifar10(source, out) -> None:
    """cifar-10-batches-py -> PNGs under OUT/images/ + train.jsonl, test.jsonl, classes.txt."""
    from extract.adapters import cifar_to_manifests

    click.echo("\n".join(cifar_to_manifests(source, out, variant="cifar10")))


@manifest.command("cifar100")
@click.argument("source", type=_SOURCE)
@_OUT_DIR
@click.option("--label", type=click.Choice(["fine", "coarse"]), default="fine", show_default=True,
              help="the 100 fine classes or the 20 superclasses")
def manifest_cifar100(source, out, label) -> None:
    """cifar-100-python -> PNGs under OUT/images/ + train.jsonl, test.jsonl, classes.txt."""
    from extract.adapters import cifar_to_manifests

    click.echo("\n".join(cifar_to_manifests(source, out, variant="cifar100", label=label)))


@manifest.command("msrvtt")
@click.argument("annotations", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="folder holding VIDEO_ID.mp4 files (searched recursively)")
@_OUT_DIR
def manifest_msrvtt(annotations, videos, out) -> None:
    """MSR-VTT annotation JSON(s) -> SPLIT.videos.jsonl + SPLIT.captions.jsonl (captions 'ref' their video);
    MSRVTT_JSFUSION_test.csv -> the 1k-A split test1k.videos.jsonl + test1k.captions.jsonl."""
    from extract.adapters import msrvtt_to_manifests

    click.echo("\n".join(msrvtt_to_manifests(annotations, videos, out)))


@manifest.command("daquar")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of imageN.png (default: SOURCE/images or SOURCE/nyu_depth_images)")
@click.option("--subset", type=click.Choice(["37", "894"]), default=None,
              help="reduced (qa.37.*) or full (qa.894.*) DAQUAR, when SOURCE holds both")
@_OUT_DIR
def manifest_daquar(source, images, subset, out) -> None:
    """DAQUAR qa.{37,894}.raw.{train,test}.txt -> SPLIT.images.jsonl + SPLIT.questions.jsonl (ref = image,
    label = answer)."""
    from extract.adapters import daquar_to_manifests

    click.echo("\n".join(daquar_to_manifests(source, out, images_dir=images, subset=subset)))


@manifest.command("textcaps")
@click.argument("annotations", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of IMAGE_ID.jpg (default: train_images/ or test_images/ beside each JSON file)")
@_OUT_DIR
def manifest_textcaps(annotations, images, out) -> None:
    """TextCaps_0.1_{train,val,test}.json -> SPLIT.images.jsonl + SPLIT.captions.jsonl (captions 'ref' their image)."""
    from extract.adapters import textcaps_to_manifests

    click.echo("\n".join(textcaps_to_manifests(annotations, out, images_dir=images)))


@manifest.command("oxford-pets")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_OUT_DIR
@click.option("--label", type=click.Choice(["breed", "species"]), default="breed", show_default=True,
              help="the 37 breeds or cat/dog")
def manifest_oxford_pets(source, out, label) -> None:
    """Oxford-IIIT Pets (images/ + annotations/{trainval,test}.txt) -> trainval.jsonl, test.jsonl, classes.txt."""
    from extract.adapters import oxford_pets_to_manifests

    click.echo("\n".join(oxford_pets_to_manifests(source, out, label=label)))


@manifest.command("caltech101")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_OUT_DIR
@click.option("--per-class-train", type=int, default=None,
              help="write train.jsonl (N images per class) + test.jsonl (the rest) instead of all.jsonl")
@click.option("--per-class-test", type=int, default=None, help="at most this many test images per class")
@click.option("--seed", type=int, default=0, show_default=True, help="which images the split picks (deterministic)")
@click.option("--keep-background", is_flag=True, help="keep BACKGROUND_Google as a class")
def manifest_caltech101(source, out, per_class_train, per_class_test, seed, keep_background) -> None:
    """Caltech-101 101_ObjectCategories/<class>/*.jpg -> all.jsonl (or train/test), classes.txt."""
    from extract.adapters import caltech101_to_manifests

    click.echo("\n".join(caltech101_to_manifests(source, out, per_class_train=per_class_train,
                                                 per_class_test=per_class_test, seed=seed,
                                                 keep_background=keep_background)))


@manifest.command("tiny-imagenet")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_OUT_DIR
@click.option("--label-names", is_flag=True, help="label with words.txt class names instead of wnids")
def manifest_tiny_imagenet(source, out, label_names) -> None:
    """tiny-imagenet-200 -> train.jsonl, val.jsonl (labelled), test.jsonl (unlabelled), classes.txt."""
    from extract.adapters import tiny_imagenet_to_manifests

    click.echo("\n".join(tiny_imagenet_to_manifests(source, out, label_names=label_names)))


@manifest.command("msvd")
@click.argument("captions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="folder holding VIDEO_ID.avi files (YouTubeClips; searched recursively)")
@click.option("--mapping", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="youtube_mapping.txt: write the standard train/val/test split instead of all.*")
@click.option("--language", default="English", show_default=True,
              help="CSV only: keep descriptions in this Language ('all' keeps every language)")
@_OUT_DIR
def manifest_msvd(captions, videos, mapping, language, out) -> None:
    """MSVD AllVideoDescriptions.txt (or the corpus CSV) -> SPLIT.videos.jsonl + SPLIT.captions.jsonl."""
    from extract.adapters import msvd_to_manifests

    click.echo("\n".join(msvd_to_manifests(captions, videos, out, mapping=mapping,
                                           language=None if language.lower() == "all" else language)))


@manifest.command("lsmdc")
@click.argument("annotations", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="folder holding MOVIE/CLIP_ID.avi (any CLIP_ID video under it is found)")
@_OUT_DIR
def manifest_lsmdc(annotations, videos, out) -> None:
    """LSMDC16_annos_*.csv (tab-separated) -> SPLIT.videos.jsonl + SPLIT.captions.jsonl (captions 'ref' clips)."""
    from extract.adapters import lsmdc_to_manifests

    click.echo("\n".join(lsmdc_to_manifests(annotations, videos, out)))


@manifest.command("table")
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--modality", type=click.Choice(["image", "audio", "video"]), default="image", show_default=True)
@click.option("--path-column", required=True, help="column holding the media paths (like --csv_img_key)")
@click.option("--text-column", default=None, help="column holding the captions (like --csv_caption_key)")
@click.option("--id-column", default=None, help="column holding the media ids (default: the path)")
@click.option("--label-column", default=None, help="column holding a label for the media items")
@click.option("--media-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder relative paths resolve against (default: the table's folder)")
@click.option("--split", default=None, help="split name of the outputs (default: the table's file name)")
@_OUT_DIR
def manifest_table(table, modality, path_column, text_column, id_column, label_column, media_root, split,
                   out) -> None:
    """Any CSV/TSV/Parquet of media paths (+ captions) -> SPLIT.{images,audio,videos}.jsonl (+ SPLIT.captions.jsonl)."""
    from extract.adapters import table_to_manifests

    click.echo("\n".join(table_to_manifests(table, out, modality=modality, path_column=path_column,
                                            text_column=text_column, id_column=id_column, label_column=label_column,
                                            media_root=media_root, split=split)))


def _text_manifest_command(name: str, dataset: str, summary: str) -> None:
    @manifest.command(name, help=f"{summary} -> one SPLIT.jsonl per split file (id, text, label).")
    @click.argument("source", type=_SOURCE)
    @_OUT_DIR
    @click.option("--text-column", default=None, help="column or JSON field holding the text")
    @click.option("--label-column", default=None, help="column or field holding the label (TREC .label: coarse/fine)")
    @click.option("--id-column", default=None, help="column or field holding item ids (default: SPLIT-ROW)")
    def command(source, out, text_column, label_column, id_column) -> None:
        from extract.adapters import text_classification_to_manifests

        click.echo("\n".join(text_classification_to_manifests(
            source, out, dataset, text_column=text_column, label_column=label_column, id_column=id_column)))


_text_manifest_command("sst2", "sst2", "GLUE SST-2 folder (train.tsv, dev.tsv, test.tsv: sentence, label)")
_text_manifest_command("trec", "trec", "TREC folder (train_5500.label, TREC_10.label; or CSV/JSONL)")
_text_manifest_command("emotion", "emotion", "Emotion folder (train.txt 'text;label', ...; or JSONL)")
_text_manifest_command("textcls", "text", "Any TSV/CSV/JSONL file or folder of text + label columns")


# ---- fit ---------------------------------------------------------------------------------------------------------
def train_options(epochs: int, batch_size: int, lr_schedule: str = "constant", select: str = "rsum"):
    """Options every fit stage shares (defaults differ: the paper's step 2 uses 100 epochs of batch 64; fit-up's
    schedule and selection are ours, docs/training.md)."""
    options = [
        optimiser_options(epochs, batch_size),
        click.option("--val-fraction", default=0.1, show_default=True),
        sampling_option,
        click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default=lr_schedule, show_default=True,
                     help="cosine: linear warm-up over --lr-warmup of the steps, then cosine to 0; constant: the "
                          "paper's"),
        click.option("--lr-warmup", default=0.1, show_default=True, help="fraction of the steps warming up (cosine)"),
        click.option("--select", type=click.Choice(SELECTIONS), default=select,
                     show_default=True,
                     help="what picks the kept epoch on the validation split: the latest epoch within one standard "
                          "error of the lowest mean rank of the true partner (both ways), the lowest mean rank, or "
                          "the best R@1+R@5+R@10 (both ways)"),
        device_option,
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                     help="the forward under autocast to bf16 / fp16 (fp16: CUDA only, with a loss scaler); the loss "
                          "stays fp32; recorded, a resume keeps it"),
        click.option("--store-device", type=click.Choice(["none", "cpu", "cuda"]), default="none",
                     show_default=True,
                     help="hold both stores whole on this device and gather minibatches there (an epoch reads "
                          "nothing from disk; refused when they do not fit); none: read them as their size says"),
        click.option("--resume", is_flag=True, help="continue the run from its last checkpoint"),
        click.option("--strict-pairs", is_flag=True,
                     help="refuse items whose partner is absent from the other store (default: leave them out, "
                          "counted and listed in RUN/dropped-pairs.json)"),
        click.option("--no-tensorboard", "no_tensorboard", is_flag=True,
                     help="metrics.jsonl only, no RUN/tb/ event files"),
    ]
    return _apply(options)


def loss_options(command):
    """The loss is chosen once, by fit-up; fit-al trains with the run's loss."""
    options = [
        click.option("--loss", "loss_kind", type=click.Choice(["soft", "infonce"]), default="infonce",
                     show_default=True, help="soft: the paper's eqs 4-8; infonce: one-hot targets"),
        click.option("--target-mix", default=0.0, show_default=True,
                     help="soft loss: weight of one-hot targets mixed into the soft ones"),
        click.option("--warmup-epochs", default=0, show_default=True, help="soft loss: one-hot epochs first"),
        click.option("--temperature", default=FIT_UP_TEMPERATURE, show_default=True,
                     help="initial value of the learnable temperature (docs/training.md, hypothesis 6)"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _train_config(warmup_epochs: int = 0, no_tensorboard: bool = False, **kwargs):
    from pipeline.training.fit import TrainConfig

    return TrainConfig(warmup_epochs=warmup_epochs, tensorboard=not no_tensorboard, **kwargs)


def preset_option(command: str):
    from pipeline.training.presets import preset_names

    return click.option("--preset", type=click.Choice(preset_names()), default=None,
                        help=f"set every option the preset names for {command} (paper: the paper's protocol; "
                             "README, 'The paper's protocol'); options given on the command line win")


def _training_options(command: str, options: dict, recorded: dict | None) -> tuple[dict, dict | None]:
    """The options a training command runs with, and the record of its preset. ``recorded`` (a resume): the stage's
    recorded options replace every option not given on the command line (the pipeline refuses given ones that
    differ); otherwise --preset's values replace the defaults of options not given."""
    from dataclasses import fields

    from click.core import ParameterSource

    from pipeline.training.fit import TrainConfig
    from pipeline.training.presets import resolve_options

    ctx = click.get_current_context()
    explicit = {name for name in ctx.params
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    if recorded is not None:
        restored = {k: v for k, v in recorded.items()
                    if k not in explicit and k not in ("device", "tensorboard", "store_device")}
        options = {**options, **restored}
        return options, ({"name": options["preset"]} if options.get("preset") else None)
    extra = {f.name for f in fields(TrainConfig)} - {"device", "tensorboard", "store_device"}
    return resolve_options(command, {k: v for k, v in options.items() if k != "preset"}, explicit,
                           options.get("preset"), extra)


@main.command("fit-up")
@click.option("--image-store", type=STORE, required=True)
@click.option("--text-store", type=STORE, required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="run directory")
@click.option("--head", type=click.Choice(["up", "dfe", "freeze-align", "linear"]), default="up", show_default=True,
              help="up: OneEncoder's UP; dfe: LightCRL; freeze-align: its projector; linear: LiT-style baseline")
@click.option("--fusion", type=click.Choice(["add", "attention", "concat"]), default="add", show_default=True)
@click.option("--blocks", default=4, show_default=True, help="transformer blocks of the UP")
@click.option("--width", default=256, show_default=True)
@click.option("--cls-token", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="freeze-align: the image tokens start with a CLS token, which gets its own projector branch (the "
                   "paper's vision projector) instead of being averaged with the patches; auto: yes for image stores "
                   "of encoders that prepend one (ViT, DeiT, BEiT, DINOv2, CLIP, ...)")
@click.option("--pooled-skip/--no-pooled-skip", default=True, show_default=True,
              help="UP: add a linear path from the mean-pooled tokens, the UP's output gated in from 0 "
                   "(docs/training.md); --no-pooled-skip is the paper's UP")
@click.option("--dropout", default=0.1, show_default=True, help="UP / DFE dropout")
@click.option("--token-dropout", default=0.0, show_default=True,
              help="UP: in training, hide each real token but the first with this probability (an augmentation of "
                   "the cached features; docs/training.md)")
@click.option("--up-drop", default=0.0, show_default=True,
              help="UP with --pooled-skip: in training, drop the UP's whole branch for each item with this "
                   "probability (stochastic depth), so the linear path also learns to stand alone")
@click.option("--path-loss", type=click.Choice(["shared", "own"]), default="shared", show_default=True,
              help="UP with --pooled-skip: what trains the linear path. shared: the UP's loss, path and branch "
                   "together; own: a contrastive loss of its own, so the path trains exactly as --head linear does "
                   "under the same seed and the UP's branch fits what that leaves (docs/training.md, hypothesis 18)")
@click.option("--overwrite", is_flag=True, help="replace an existing run directory")
@click.option("--sweep", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GRID.json: train its configurations as one job reading each batch once, one run per "
                   "configuration under --out (README, 'Sweeps')")
@train_options(batch_size=128, **FIT_UP_SCHEDULE)
@loss_options
@preset_option("fit-up")
def fit_up(**options) -> None:
    """Step 1: train the Universal Projection on image-text pairs, from cached features only. --resume continues
    with the run's recorded options; an option given that differs from them is refused (--epochs may grow)."""
    from pipeline.training.distributed import is_main, session
    from pipeline.training.fit import HEAD_OPTIONS, LossConfig, recorded_options
    from pipeline.training.fit import fit_up as run_fit_up
    from pipeline.training.rundir import RunDir

    run = RunDir(options["out"])
    recorded = recorded_options(run.read_config(), "fit-up") if options["resume"] and run.exists() else None
    o, preset = _training_options("fit-up", options, recorded)
    loss = LossConfig(kind=o.pop("loss_kind"), init_temperature=o.pop("temperature"), target_mix=o.pop("target_mix"))
    given = {k: o.pop(k) for k in ("image_store", "text_store", "out", "head", "width", "blocks", "fusion", "resume",
                                   "overwrite")}
    cls_token = {"auto": None, "yes": True, "no": False}[o.pop("cls_token")]
    pooled_skip = o.pop("pooled_skip")
    head_options = {name: o.pop(name) for name in HEAD_OPTIONS}
    o.pop("preset", None)
    sweep = o.pop("sweep")
    with session(o.pop("device")) as device:  # joins torchrun's group when launched by it
        if sweep is not None:
            from pipeline.training.sweep import fit_up_sweep, read_grid

            result = fit_up_sweep(given.pop("image_store"), given.pop("text_store"), given.pop("out"),
                                  read_grid(sweep), **given, cls_token=cls_token, pooled_skip=pooled_skip,
                                  head_options=head_options, loss=loss, preset=preset,
                                  train=_train_config(**o, device=device))
            click.echo("\n".join(f"run written to {r['run']}" for r in result["runs"]))
            return
        summary = run_fit_up(given.pop("image_store"), given.pop("text_store"), given.pop("out"), **given,
                             cls_token=cls_token, pooled_skip=pooled_skip, head_options=head_options, loss=loss,
                             preset=preset, train=_train_config(**o, device=device))
        if is_main():
            click.echo(f"run written to {summary['run']}")


MODALITIES = ["image", "text", "audio", "video"]


@main.command("fit-al")
@run_option("--run-dir", help="the run to extend (--run-dir under torchrun, whose parser takes --run for its own)")
@click.option("--modality", required=True, help="the new modality, e.g. audio or video")
@click.option("--store", type=STORE, required=True,
              help="feature store of the new modality")
@click.option("--pivot", required=True, help="an already aligned modality paired with the new one, e.g. text")
@click.option("--pivot-store", type=STORE, required=True)
@click.option("--al", type=click.Choice(["linear", "mlp", "projector"]), default=None,
              help="linear: one Linear(D, width) (the paper's 65,792 params at D=256; the UP's default); mlp: two "
                   "layers; projector: freeze-align's own (its default)")
@train_options(epochs=100, batch_size=64)
@preset_option("fit-al")
def fit_al(**options) -> None:
    """Step 2: freeze the UP and align a new modality by training only its Alignment Layer, from cache. --resume
    continues with the stage's recorded options; an option given that differs from them is refused."""
    from pipeline.training.distributed import is_main, session
    from pipeline.training.fit import fit_al as run_fit_al
    from pipeline.training.fit import recorded_options
    from pipeline.training.rundir import RunDir

    modality = options["modality"]
    config = RunDir(options["run_dir"]).read_config()
    resuming = options["resume"] and modality in config["modalities"]
    o, preset = _training_options("fit-al", options, recorded_options(config, f"fit-al:{modality}")
                                  if resuming else None)
    given = {k: o.pop(k) for k in ("run_dir", "modality", "store", "pivot", "pivot_store", "al", "resume")}
    o.pop("preset", None)
    with session(o.pop("device")) as device:  # joins torchrun's group when launched by it
        summary = run_fit_al(given.pop("run_dir"), given.pop("modality"), given.pop("store"), given.pop("pivot"),
                             given.pop("pivot_store"), **given, preset=preset,
                             train=_train_config(**o, device=device))
        if is_main():
            click.echo(f"{modality} aligned in {summary['run']} (trained: {', '.join(summary['trainable_parameters'])})")


@main.command("fit-vqa")
@run_option(help="a trained run (its UP embeds both sides)")
@click.option("--image-store", type=STORE, required=True, help="training images")
@click.option("--question-store", type=STORE, required=True,
              help="training questions (text store; ref = image id, label = answer)")
@click.option("--test-image-store", type=STORE, default=None)
@click.option("--test-question-store", type=STORE, default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output folder (default: RUN/vqa)")
@optimiser_options(epochs=100, batch_size=64)
@click.option("--hidden", default=512, show_default=True,
              help="hidden width of the prediction head's MLP; 0: one linear layer (the paper's literal head)")
@click.option("--dropout", default=0.1, show_default=True)
@click.option("--fusion", type=click.Choice(["concat", "concat-product"]), default="concat", show_default=True,
              help="MLP input: [image; question] or [image; question; image * question] (unit vectors)")
@click.option("--unfreeze", is_flag=True, help="train the UP with the head (the paper's setting); default: frozen")
@device_option
@click.option("--overwrite", is_flag=True, help="replace an existing VQA output folder")
@preset_option("fit-vqa")
def fit_vqa(**options) -> None:
    """Visual question answering from cache: the run's UP embeds images and questions, a prediction head
    classifies into the training answers. Reports accuracy, macro F1 and WUPS@0.9/0.0 (WordNet permitting)."""
    from pipeline.evaluation.vqa import VQASettings
    from pipeline.evaluation.vqa import fit_vqa as run_fit_vqa
    from pipeline.training.fit import TrainConfig

    o, preset = _training_options("fit-vqa", options, None)
    if (o["test_image_store"] is None) != (o["test_question_store"] is None):
        raise click.UsageError("give both --test-image-store and --test-question-store, or neither")
    settings = VQASettings(**{k: o.pop(k) for k in ("hidden", "dropout", "fusion", "unfreeze")})
    given = {k: o.pop(k) for k in ("run_dir", "image_store", "question_store", "out", "test_image_store",
                                   "test_question_store", "overwrite")}
    o.pop("preset", None)
    report = run_fit_vqa(given.pop("run_dir"), given.pop("image_store"), given.pop("question_store"),
                         given.pop("out"), **given, settings=settings, train=TrainConfig(**o), preset=preset)
    for split in ("train", "test"):
        m = report[split]
        if m is None:
            continue
        wups = "".join(f"  {k} {v:.3f}" for k, v in (m["wups"] or {}).items())
        click.echo(f"{split:<5} {m['questions']} questions: accuracy {m['accuracy']:.3f}  F1 {m['f1_macro']:.3f}"
                   f"{wups}  (majority answer: accuracy {m['majority_baseline']['accuracy']:.3f})")
    if not report["wups_computed"]:
        click.echo(report["wups_not_computed"])
    click.echo(f"report: {report['report_path']}\ntable: {report['markdown_path']}")


@main.command("fit-base")
@click.option("--image-encoder", required=True, help="transformers image encoder (hub id or local dir) to train")
@click.option("--text-encoder", required=True, help="transformers text encoder (hub id or local dir) to train")
@click.option("--image-manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--text-manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="captions whose 'ref' names their image")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="run directory")
@click.option("--head", type=click.Choice(["linear", "up", "dfe", "freeze-align"]), default="linear",
              show_default=True, help="projection on top of the encoders (linear: CLIP-style)")
@click.option("--width", default=256, show_default=True)
@click.option("--blocks", default=4, show_default=True, help="--head up/dfe: transformer blocks")
@click.option("--fusion", type=click.Choice(["add", "attention", "concat"]), default="add", show_default=True)
@optimiser_options(epochs=10, batch_size=64, lr_help="learning rate of the head and temperature")
@click.option("--encoder-lr", default=1e-5, show_default=True, help="learning rate of the encoders")
@click.option("--val-fraction", default=0.1, show_default=True)
@sampling_option
@device_option
@click.option("--overwrite", is_flag=True, help="replace an existing run directory")
@loss_options
def fit_base(image_encoder, text_encoder, image_manifest, text_manifest, out, head, width, blocks, fusion, epochs,
             batch_size, lr, encoder_lr, weight_decay, val_fraction, seed, sampling, device, overwrite, loss_kind,
             target_mix, warmup_epochs, temperature) -> None:
    """The paper's "Base" baseline: the same pairs and loss, encoders trained end to end from raw media (not from
    cache). Writes a run that eval retrieval reads from stores extracted with RUN/encoders/{image,text}."""
    from pipeline.training.base import fit_base as run_fit_base
    from pipeline.training.fit import LossConfig

    summary = run_fit_base(
        image_encoder, text_encoder, image_manifest, text_manifest, out, head=head, width=width, blocks=blocks,
        fusion=fusion, encoder_lr=encoder_lr,
        loss=LossConfig(kind=loss_kind, init_temperature=temperature, target_mix=target_mix),
        # The weights are chosen by fit-up's rule, so the Base baseline and the UP compare on equal terms.
        train=_train_config(warmup_epochs, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            val_fraction=val_fraction, seed=seed, sampling=sampling, device=device,
                            select=FIT_UP_SCHEDULE["select"]),
        overwrite=overwrite)
    click.echo(f"run written to {summary['run']}; fine-tuned encoders: {summary['encoders']['image']}, "
               f"{summary['encoders']['text']}")


# ---- encoder selection and data curation -------------------------------------------------------------------------
@main.command()
@click.option("--store", "store_paths", type=STORE, multiple=True,
              required=True, help="a candidate encoder's store; repeat for every candidate of both modalities")
@click.option("--pairs", "pairs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help='JSONL of {"a": id, "b": id}: a = an id of the image (first) modality, b of the other; '
                   "default: pair by ref/ids like fit-up, one pair per image")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for cka.json and the heatmap cka.png")
@click.option("--estimator", type=click.Choice(["auto", "full", "minibatch"]), default="minibatch", show_default=True,
              help="minibatch: unbiased HSIC (one batch when the pairs fit in --batch-size); full: the biased "
                   "full-batch estimator (scores noise high on few pairs); auto: full when it fits in --memory-gb")
@click.option("--batch-size", default=1024, show_default=True, help="rows per minibatch of the minibatch estimator")
@click.option("--memory-gb", type=float, default=None, help="memory the full estimator may use (default: the store "
                                                            "RAM budget, ONEENCODER_RAM_BUDGET_GB or 4)")
@click.option("--seed", default=0, show_default=True, help="order of the minibatches")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (docs/json.md)")
def cka(store_paths, pairs_file, out, estimator, batch_size, memory_gb, seed, as_json) -> None:
    """Rank image x text encoder pairs by linear CKA of their pooled features on paired samples (freeze-align)."""
    from pipeline.evaluation.cka import format_ranking, store_cka

    report = store_cka(store_paths, pairs_file=pairs_file, estimator=estimator, batch_size=batch_size,
                       memory_gb=memory_gb, seed=seed, out=out)
    click.echo(json.dumps(report, indent=2) if as_json else format_ranking(report))


@main.command()
@click.option("--prototypes", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="labelled store (e.g. images of the concepts); prototype = mean embedding per label")
@click.option("--captions", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="store of the captions to choose from")
@click.option("--per-concept", type=int, required=True, help="captions kept per concept (K)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSONL manifest written")
@run_option(required=False, help="compare in this run's aligned space (required when the raw feature widths differ)")
@click.option("--batch-size", default=1024, show_default=True)
@device_option
def curate(prototypes, captions, per_concept, out, run_dir, batch_size, device) -> None:
    """Keep the K captions closest (cosine) to each concept prototype; each caption goes to its best concept."""
    from pipeline.curate import curate as run_curate
    from pipeline.curate import format_curation

    click.echo(format_curation(run_curate(prototypes, captions, per_concept, out, run_dir=run_dir,
                                          batch_size=batch_size, device=device)))


# ---- eval --------------------------------------------------------------------------------------------------------
@main.group("eval")
def evaluate() -> None:
    """Evaluate a trained run from cached features."""


def _print_retrieval(report: dict) -> None:
    rows = report["metrics"]
    click.echo(f"{'direction':<16}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'P@1':>7}{'rec@1':>7}{'mAP':>7}{'MedR':>7}"
               f"{'MeanR':>8}{'queries':>9}")
    for direction, m in rows.items():
        click.echo(f"{direction:<16}{m['R@1']:>7.3f}{m['R@5']:>7.3f}{m['R@10']:>7.3f}{m['P@1']:>7.3f}"
                   f"{m['recall@1']:>7.3f}{m['mAP']:>7.3f}{m['median_rank']:>7.1f}{m['mean_rank']:>8.1f}"
                   f"{m['queries']:>9}")
    chance = ", ".join(f"{k} {v:.3f}" for k, v in report["chance_R@1"].items())
    click.echo(f"chance R@1: {chance}\nreport: {report['report_path']}")


@evaluate.command("retrieval")
@run_option()
@click.option("--image-store", type=STORE)
@click.option("--text-store", type=STORE)
@click.option("--audio-store", type=STORE)
@click.option("--video-store", type=STORE)
@device_option
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
def eval_retrieval(run_dir, image_store, text_store, audio_store, video_store, device, as_json) -> None:
    """Retrieval both ways between any two aligned modalities (give exactly two stores), including pairs never
    trained together (audio<->image: transitive alignment). R@1/5/10, P@1, recall@1, mAP, median and mean rank."""
    from pipeline.evaluation.evaluate import evaluate_retrieval

    given = [s for s in (image_store, text_store, audio_store, video_store) if s is not None]
    if len(given) != 2:
        raise click.UsageError("give exactly two of --image-store, --text-store, --audio-store, --video-store")
    report = evaluate_retrieval(run_dir, given[0], given[1], device=device)
    click.echo(json.dumps(report, indent=2)) if as_json else _print_retrieval(report)


@evaluate.command("sheet")
@run_option()
@click.option("--image-store", type=STORE, required=True)
@click.option("--text-store", type=STORE, required=True)
@click.option("--queries", default=8, show_default=True, help="queries drawn per direction")
@click.option("--k", default=5, show_default=True, help="results shown per query")
@click.option("--seed", default=0, show_default=True, help="which queries are drawn")
@click.option("--direction", type=click.Choice(["both", "text-to-image", "image-to-text"]), default="both",
              show_default=True)
@click.option("--thumb", default=128, show_default=True, help="thumbnail size in pixels")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="FILE.html (self-contained page) or FILE.png (grid); default RUN/eval/retrieval-sheet.html")
@device_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (docs/json.md)")
def eval_sheet(run_dir, image_store, text_store, queries, k, seed, direction, thumb, out, device, as_json) -> None:
    """Qualitative retrieval sheet (the paper's Figure 4): captions -> top-k images and images -> top-k captions,
    ground truth highlighted; images and texts come from the stores' manifests (ids when those changed)."""
    from pipeline.evaluation.sheet import retrieval_sheet

    directions = {"both": ("text->image", "image->text"), "text-to-image": ("text->image",),
                  "image-to-text": ("image->text",)}[direction]
    report = retrieval_sheet(run_dir, image_store, text_store, out, queries=queries, k=k, seed=seed,
                             directions=directions, thumb=thumb, device=device)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    for d, hits in report["hits_in_top_k"].items():
        shown = sum(1 for r in report["rows"] if r["direction"] == d)
        click.echo(f"{d}: ground truth in the top {k} for {hits} of {shown} queries")
    click.echo(f"sheet: {report['out']}")


@evaluate.command("zero-shot")
@run_option()
@click.option("--image-store", type=STORE, required=True)
@click.option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="one class name per line; item labels are class names or indices")
@click.option("--template", default="a photo of a {}.", show_default=True)
@click.option("--text-encoder", default=None, help="the encoder the text store was extracted with (text prompts)")
@click.option("--prompt-store", type=STORE, default=None,
              help="instead of text: a labelled store of another aligned modality whose items are the prompts, "
                   "e.g. spoken class names (the paper's Table VI)")
@device_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (docs/json.md)")
def eval_zero_shot(run_dir, image_store, classes, template, text_encoder, prompt_store, device, as_json) -> None:
    """Classify images by similarity to prompts made from class names (or labelled audio clips); top-1..5 accuracy."""
    from pipeline.evaluation.evaluate import evaluate_zero_shot

    report = evaluate_zero_shot(run_dir, image_store, classes, text_encoder, template=template, device=device,
                                prompt_store=prompt_store)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    accuracy = "  ".join(f"{k} {v:.3f}" for k, v in report["accuracy"].items())
    click.echo(f"zero-shot on {report['items']} images, {len(report['classes'])} classes: {accuracy}"
               f"  (chance top1 {report['chance_top1']:.3f})\nreport: {report['report_path']}")


@evaluate.command("linear-probe")
@run_option(required=False, help="the run whose aligned embeddings are probed; reports go to RUN/eval")
@click.option("--train-store", type=STORE, required=True,
              help="labelled store the classifier is trained on")
@click.option("--test-store", type=STORE, required=True)
@click.option("--features", type=click.Choice(["aligned", "raw"]), default="aligned", show_default=True,
              help="aligned: the run's L2-normalised embeddings; raw: the stores' pooled features (a baseline)")
@optimiser_options(epochs=100, batch_size=256, weight_decay=0.0)
@click.option("--eval-every", type=int, default=None, help="epochs between test checkpoints (default: epochs/10)")
@device_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="report folder (default: RUN/eval)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (docs/json.md)")
def eval_linear_probe(run_dir, train_store, test_store, features, epochs, lr, batch_size, weight_decay, eval_every,
                      seed, device, out_dir, as_json) -> None:
    """Train a linear classifier on frozen cached features of a labelled store; test accuracy per checkpoint."""
    from pipeline.evaluation.probe import linear_probe

    report = linear_probe(train_store, test_store, run_dir=run_dir, features=features, epochs=epochs, lr=lr,
                          batch_size=batch_size, weight_decay=weight_decay, eval_every=eval_every, seed=seed,
                          device=device, out_dir=out_dir, progress=not as_json)  # stdout: JSON only
    click.echo(json.dumps(report, indent=2, ensure_ascii=False)) if as_json else _print_classification(report)


def _print_classification(report: dict) -> None:
    final, best = report["final"], report["best"]
    click.echo(f"{report['task'].replace('-', ' ')} on {report['space']}: {len(report['classes'])} classes, "
               f"{report['test_items']} test items\nfinal (epoch {final['epoch']}) test top1 {final['top1']:.3f}; "
               f"best checkpoint (epoch {best['epoch']}, selected on test) {best['top1']:.3f}; chance "
               f"{report['chance_top1']:.3f}, majority {report['majority_top1']:.3f}\nreport: {report['report_path']}"
               f"\ntable: {report['markdown_path']}" + (f"\nweights: {report['weights']}" if "weights" in report else ""))


@evaluate.command("fine-tune")
@run_option(help="the run whose head is fine-tuned (its own files are never written); reports go to RUN/eval")
@click.option("--train-store", type=STORE, required=True,
              help="labelled store the head and classifier are trained on")
@click.option("--test-store", type=STORE, required=True)
@optimiser_options(epochs=100, batch_size=256, weight_decay=0.0,
                   lr_help="AdamW learning rate of the head and the classifier")
@click.option("--eval-every", type=int, default=1, show_default=True, help="epochs between test checkpoints")
@device_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the report and the fine-tuned weights (default: RUN/eval)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (docs/json.md)")
def eval_fine_tune(run_dir, train_store, test_store, epochs, lr, batch_size, weight_decay, eval_every, seed, device,
                   out_dir, as_json) -> None:
    """The paper's fine-tuning protocol: the run's head (UP + the modality's adapter) trains with a linear
    classifier on its aligned embedding, from cached tokens (encoders frozen); test accuracy per epoch. The
    fine-tuned weights go to OUT/fine-tune-<test store>-<key>--train-<train store>-<key>/, never over the run's own
    model."""
    from pipeline.evaluation.probe import fine_tune

    report = fine_tune(train_store, test_store, run_dir, epochs=epochs, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, eval_every=eval_every, seed=seed, device=device, out_dir=out_dir,
                       progress=not as_json)  # stdout: JSON only
    click.echo(json.dumps(report, indent=2, ensure_ascii=False)) if as_json else _print_classification(report)


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("report"), show_default=True,
              help="folder for report.md, report.json and the PNG plots")
def report(run_dirs, out) -> None:
    """Several runs side by side: one row per run (head, fusion, key options), then one table per task and set of
    stores evaluated on (by identity key), one column per metric of their eval reports (retrieval R@k, zero-shot,
    linear probe, fine-tune); figures of different stores never share a column. Loss, temperature, recall@k plots."""
    from pipeline.evaluation.report import compare_runs

    result = compare_runs(run_dirs, out)
    click.echo(Path(result["markdown_path"]).read_text(encoding="utf-8"))
    click.echo(f"report: {result['report_path']}\nplots: {', '.join(p for p in result['plots'].values() if p)}")


# ---- encode ------------------------------------------------------------------------------------------------------
@main.command()
@run_option()
@click.option("--modality", required=True)
@click.argument("inputs", nargs=-1, required=True)
@click.option("--encoder", "encoder_spec", default=None,
              help="the encoder the run's store was built with (default: the one it recorded)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=".npy file (rows in input order; ids in FILE.ids.json); default: print JSON")
@device_option
@click.option("--trust-plugins", is_flag=True,
              help="run the encoder plugin the run recorded (its code runs: only for runs you trust)")
def encode(run_dir, modality, inputs, encoder_spec, out, device, trust_plugins) -> None:
    """Raw files (or strings for text) -> aligned, L2-normalised embeddings, via the same extraction path."""
    import numpy as np

    from pipeline.encode import encode as run_encode

    ids, embeddings = run_encode(run_dir, modality, list(inputs), encoder_spec=encoder_spec, device=device,
                                 trust_plugins=trust_plugins)
    if out is None:
        click.echo(json.dumps({"ids": ids, "embeddings": embeddings.round(6).tolist()}))
        return
    np.save(out, embeddings)
    Path(f"{out}.ids.json").write_text(json.dumps(ids))
    click.echo(f"{len(ids)} embeddings of width {embeddings.shape[1]} written to {out}")


# ---- embed, index, search ----------------------------------------------------------------------------------------
@main.command("embed")
@run_option()
@click.option("--store", type=STORE, required=True, help="store of any modality the run aligns")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for the embeddings, their ids and embed.json (run and store identity)")
@click.option("--format", "fmt", type=click.Choice(["npy", "parquet"]), default="npy", show_default=True,
              help="npy: embeddings.npy + ids.json; parquet: part-NNNNN.parquet (id, embedding)")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--chunk-rows", default=65536, show_default=True,
              help="rows written (and resumable) at a time; a parquet part each")
@device_option
@click.option("--overwrite", is_flag=True, help="replace embeddings made from another run or store")
@click.option("--json", "as_json", is_flag=True, help="print the embed.json record")
def embed(run_dir, store, out, fmt, batch_size, chunk_rows, device, overwrite, as_json) -> None:
    """A whole store through the run's head: aligned unit vectors, written in chunks, resumable."""
    from pipeline.embed import embed_to_files

    record = embed_to_files(run_dir, store, out, fmt=fmt, batch_size=batch_size, chunk_rows=chunk_rows,
                            device=device, overwrite=overwrite, progress=True)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    resumed = f" (resumed at row {record['resumed_from']})" if record["resumed_from"] else ""
    click.echo(f"{record['count']} {record['modality']} embeddings of width {record['width']} in {out} "
               f"({record['format']}){resumed}")


@main.command("index")
@click.option("--embeddings", "folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="a folder written by embed; the index is saved in it")
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf"]), default="auto", show_default=True,
              help="flat: exact; hnsw / ivf: approximate; auto: exact up to 100,000 vectors, IVF past that")
@click.option("--nlist", type=int, default=None, help="ivf: cells (default 4 sqrt(N))")
@click.option("--nprobe", type=int, default=None, help="ivf: cells searched (default nlist / 16)")
@click.option("--json", "as_json", is_flag=True, help="print the index.json record")
def index(folder, kind, nlist, nprobe, as_json) -> None:
    """Build a FAISS nearest-neighbour index over an embedding folder."""
    from pipeline.search import build_index

    record = build_index(folder, kind, nlist=nlist, nprobe=nprobe)
    click.echo(json.dumps(record, indent=2) if as_json else
               f"{record['kind']} index over {record['vectors']} vectors written to {folder}")


@main.command("search")
@run_option(help="the run that made the embeddings")
@click.option("--index", "folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="an embedding folder with an index")
@click.option("--text", default=None, help="query text")
@click.option("--image", "image_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--audio", "audio_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--video", "video_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--item", default=None, help="an item id: of --item-store, else of the indexed items")
@click.option("--item-store", type=STORE, default=None, help="the store (any aligned modality) --item is taken from")
@click.option("--k", default=10, show_default=True)
@click.option("--encoder", "encoder_spec", default=None,
              help="the encoder of the query's modality (default: the one the run's store recorded)")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the results as an HTML page")
@device_option
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def search(run_dir, folder, text, image_file, audio_file, video_file, item, item_store, k, encoder_spec, html_out,
           device, as_json) -> None:
    """The k nearest indexed items to a text, a media file or an item: rank, score, id and path (or text)."""
    from pipeline.search import search as run_search
    from pipeline.search import search_html

    files = {m: f for m, f in (("image", image_file), ("audio", audio_file), ("video", video_file)) if f}
    if sum(x is not None for x in (text, item)) + len(files) != 1:
        raise click.UsageError("give exactly one query: --text, --image, --audio, --video or --item")
    if item_store is not None and item is None:
        raise click.UsageError("--item-store needs --item")
    modality, file = next(iter(files.items())) if files else (None, None)
    report = run_search(run_dir, folder, k, text=text, file=file, modality=modality, item=item,
                        item_store=item_store, encoder_spec=encoder_spec, device=device)
    if html_out is not None:
        report["html"] = str(search_html(report, html_out))
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    for hit in report["results"]:
        shown = hit.get("path") or hit.get("text") or ""
        click.echo(f"{hit['rank']:>4}  {hit['score']:>8.4f}  {hit['id']}  {shown}")
    if html_out is not None:
        click.echo(f"sheet: {report['html']}")


# ---- stores ------------------------------------------------------------------------------------------------------
@main.group()
def stores() -> None:
    """Inspect, export and import feature stores."""


@stores.command("ls")
@click.argument("root", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of the stores (docs/json.md)")
def stores_ls(root, as_json) -> None:
    """Every feature store at or below ROOT, one line each (the path last, so long paths never shift columns)."""
    from stores import describe, find_stores

    infos = [describe(path) for path in find_stores(root)]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    if not infos:
        click.echo(f"no feature store under {root}")
        return
    columns = [("modality", "<"), ("layout", "<"), ("dtype", "<"), ("items", ">"), ("tokens", ">"), ("dim", ">"),
               ("MB", ">"), ("state", "<"), ("key", "<"), ("encoder", "<"), ("store", "<")]
    rows = [{"modality": i["modality"], "layout": i["layout"], "dtype": str(i["dtype"]), "items": str(i["items"]),
             "tokens": str(i["tokens"]), "dim": str(i["dim"]), "MB": f"{i['disk_bytes'] / 1e6:.1f}",
             "state": "complete" if i["complete"] else "INCOMPLETE", "key": str(i["key"]),
             "encoder": str(((i["identity"] or {}).get("encoder") or {}).get("id")
                            or (i["summary"] or {}).get("encoder_spec") or "-"), "store": i["path"]} for i in infos]
    widths = {name: max(len(name), *(len(r[name]) for r in rows)) for name, _ in columns}
    for row in [{name: name for name, _ in columns}, *rows]:
        click.echo("  ".join(f"{row[name]:{align}{widths[name] if name != 'store' else 0}}"
                             for name, align in columns).rstrip())


@stores.command("info")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True)
def stores_info(store, as_json) -> None:
    """What a store holds and how it was made (encoder, weights hash, preprocessing, manifest hash)."""
    from stores import describe, format_info

    info = describe(store)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@stores.command("verify")
@click.argument("store", type=STORE)
@click.option("--repair", is_flag=True, help="re-extract exactly the bad shards from the source media")
@click.option("--trust-plugins", is_flag=True,
              help="let --repair run the encoder plugin the store recorded (its code runs: only for stores you trust)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (docs/json.md); exit 1 still means bad")
def stores_verify(store, repair, trust_plugins, as_json) -> None:
    """Re-hash every shard against the store's manifest; name any missing, truncated or altered one."""
    from stores import verify

    problems = verify(store)
    repaired = None
    if problems and repair:
        from extract.repair import repair_store

        repaired = repair_store(store, trust_plugins=trust_plugins)
        if not as_json:
            click.echo(f"repaired {len(repaired)} shard(s): {'; '.join(repaired)}")
        problems = verify(store)
    if as_json:
        click.echo(json.dumps({"store": str(store), "ok": not problems,
                               "repaired": None if repaired is None else [str(r) for r in repaired],
                               "problems": [{"array": p.array, "shard": p.shard,
                                             "rows": list(p.rows) if p.rows else None, "reason": p.reason,
                                             "message": str(p)} for p in problems]}, indent=2))
    else:
        for problem in problems:
            click.echo(f"BAD  {problem}")
    if problems:
        raise click.ClickException(f"{len(problems)} bad shard(s) in {store}")
    if not as_json:
        click.echo(f"ok: every shard of {store} matches its manifest entry")


@stores.command("errors")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (docs/json.md)")
def stores_errors(store, as_json) -> None:
    """Items the extraction left out, with the reason."""
    from stores import FeatureStore

    errors = FeatureStore.open(store, allow_incomplete=True).errors()
    if as_json:
        click.echo(json.dumps({"store": str(store), "count": len(errors), "errors": errors}, indent=2,
                              ensure_ascii=False))
        return
    for error in errors:
        click.echo(json.dumps(error, ensure_ascii=False))
    click.echo(f"{len(errors)} item(s) left out", err=True)


@stores.command("export")
@click.argument("store", type=STORE)
@click.option("--format", "fmt", type=click.Choice(["hdf5", "npy"]), default="hdf5", show_default=True,
              help="one HDF5 file, or a folder of .npy files + meta.json")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
def stores_export(store, fmt, out, overwrite) -> None:
    """Write a store's tokens, lengths, ids, labels, refs and identity to HDF5 or .npy (docs/store-format.md)."""
    from stores.interop import export_store

    click.echo(f"{store} exported to {export_store(store, out, fmt, overwrite=overwrite, progress=True)}")


@stores.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--store", type=StoreParam(new=True), required=True, help="store to write")
@click.option("--modality", default=None, help="required unless the file records one")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="stored dtype (default: the file's recorded one, else fp16 for float16 features, else fp32)")
@click.option("--shard-mb", default=64.0, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace a store made differently")
def stores_import(file, store, modality, dtype, shard_mb, overwrite) -> None:
    """An HDF5 file with 'features' and 'ids' (ours, or made elsewhere) -> a feature store."""
    from stores.interop import import_hdf5

    summary = import_hdf5(file, store, modality=modality, dtype=dtype, overwrite=overwrite, shard_mb=shard_mb,
                          progress=True)
    done = "already imported" if summary.get("skipped") else "imported"
    failed = int(summary.get("failed") or 0)
    left_out = f"; {failed} left out (see 'stores errors')" if failed and not summary.get("skipped") else ""
    click.echo(f"{summary['items']} items {done} into {store}{left_out}")


# ---- demo --------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--images", default=400, show_default=True, help="generated images (2 captions each)")
@click.option("--epochs", default=15, show_default=True)
@click.option("--tiny", is_flag=True, help="use tiny random encoders even when real offline weights are installed")
def demo(out, images, epochs, tiny) -> None:
    """The whole loop offline: generate shapes + captions, extract, fit the UP, evaluate against chance."""
    from pipeline.demo import run_demo

    run_demo(out, n_images=images, epochs=epochs, force_tiny=tiny)


@main.command()
@click.option("--quick", is_flag=True, help="small sizes, fewer repetitions (a smoke test; minutes on 2 cores)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench.json"),
              show_default=True, help="JSON report")
@device_option
@click.option("--json", "as_json", is_flag=True,
              help="print the JSON report on stdout (the table and progress go to stderr; docs/json.md)")
@click.option("--gpu-only", is_flag=True, help="only the GPU rows (pipeline/tools/gpu_check.sh)")
def bench(quick, out, device, as_json, gpu_only) -> None:
    """Performance suite on generated data: training from cache, extraction, storage, memory, no-op re-runs."""
    from pipeline.tools.bench import run_bench

    report = run_bench("quick" if quick else "full", out, device=device,
                       echo=functools.partial(click.echo, err=True) if as_json else click.echo, gpu_only=gpu_only)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))  # as bench.json is written



# ---- environment -------------------------------------------------------------------------------------------------
@main.command()
def doctor() -> None:
    """Check that torch, torchaudio, transformers, zarr, tensorstore and PyAV load and work here; exit 1 if not."""
    from pipeline.tools.doctor import run_checks

    checks = run_checks()
    for check in checks:
        click.echo(check.line())
    if not all(check.ok for check in checks):
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
