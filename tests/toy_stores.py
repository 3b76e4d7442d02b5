"""Separable toy image/text stores written through the real StoreWriter, for pipeline and CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch

from stores import StoreWriter


def _write(path: Path, modality: str, layout: str, items: list[torch.Tensor], metas: list[dict], dim: int,
           tokens_per_item: int | None, identity: dict) -> Path:
    writer = StoreWriter.create(path, modality=modality, layout=layout, dim=dim, tokens_per_item=tokens_per_item,
                                dtype="float16", identity=identity, shard_mb=0.05)
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        width = max(t.shape[0] for t in chunk)
        padded = torch.zeros(len(chunk), width, dim)
        for i, t in enumerate(chunk):
            padded[i, : t.shape[0]] = t
        writer.add_batch(metas[start : start + 16], padded, torch.tensor([t.shape[0] for t in chunk]))
    writer.finish()
    return path


def make_toy_pair(root: Path, n_images: int = 64, captions: int = 2, seed: int = 0, image_dim: int = 24,
                  text_dim: int = 16, noise: float = 0.3, tag: str = "toy") -> tuple[Path, Path]:
    """Image store (fixed, 6 tokens) and caption store (ragged, 2-8 tokens) where each caption carries a noisy
    linear image of its own image's latent code, so a good projection retrieves pairs almost perfectly."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_images, 8, generator=gen)  # first draw: make_toy_modality regenerates it from the seed
    to_image, to_text = torch.randn(8, image_dim, generator=gen), torch.randn(8, text_dim, generator=gen)
    images = [latent[i] @ to_image + noise * torch.randn(6, image_dim, generator=gen) for i in range(n_images)]
    image_metas = [{"id": f"img{i}", "label": int(latent[i, 0] > 0)} for i in range(n_images)]
    texts, text_metas = [], []
    for i in range(n_images):
        for c in range(captions):
            length = int(torch.randint(2, 9, (1,), generator=gen))
            texts.append(latent[i] @ to_text + noise * torch.randn(length, text_dim, generator=gen))
            text_metas.append({"id": f"img{i}-cap{c}", "ref": f"img{i}"})
    encoder = {"encoder": {"id": f"{tag}-encoder"}, "layer": -1, "keep": "tokens"}
    image_store = _write(root / f"{tag}-image", "image", "fixed", images, image_metas, image_dim, 6,
                         {**encoder, "modality": "image", "manifest_sha256": f"{tag}-{seed}-img"})
    text_store = _write(root / f"{tag}-text", "text", "ragged", texts, text_metas, text_dim, None,
                        {**encoder, "modality": "text", "manifest_sha256": f"{tag}-{seed}-txt"})
    return image_store, text_store


def make_toy_modality(root: Path, modality: str, n_images: int = 64, per_image: int = 1, seed: int = 0,
                      dim: int = 12, noise: float = 0.3, tag: str = "toy", labelled: bool = False,
                      ref: str = "img{i}") -> Path:
    """A ragged store of a further modality (e.g. spoken captions) whose items ``ref`` the image they describe and
    carry the same latent codes as :func:`make_toy_pair` with that seed: pairs with text through the shared ref,
    with images directly (transitive evaluation). ``labelled``: items carry their image's label (as the images do).
    ``ref``: the ref of image ``i``'s items (``"img{i}-cap0"``: its first caption instead of the image)."""
    latent = torch.randn(n_images, 8, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 7919)
    to_modality = torch.randn(8, dim, generator=gen)
    items, metas = [], []
    for i in range(n_images):
        for k in range(per_image):
            length = int(torch.randint(3, 12, (1,), generator=gen))
            items.append(torch.tanh(latent[i] @ to_modality) + noise * torch.randn(length, dim, generator=gen))
            metas.append({"id": f"{modality}{i}-{k}", "ref": ref.format(i=i),
                          **({"label": int(latent[i, 0] > 0)} if labelled else {})})
    identity = {"encoder": {"id": f"{tag}-{modality}-encoder"}, "modality": modality, "layer": -1, "keep": "tokens",
                "manifest_sha256": f"{tag}-{seed}-{modality}"}
    return _write(root / f"{tag}-{modality}", modality, "ragged", items, metas, dim, None, identity)


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path (shards, manifest entries with the records they commit, item and
    error tables), without the metadata that records run times (``zarr.json``) and the writer lock."""
    skip = ("zarr.json", ".writer.lock")
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(Path(store).rglob("*"))
            if p.is_file() and p.name not in skip}


def make_shared_ref_stores(root: Path, n_images: int = 10, written: int = 2, spoken: int = 2, seed: int = 0,
                           tag: str = "m2m") -> dict[str, Path]:
    """Image, text and audio stores where every caption, written or spoken, ``ref``s its image: text and audio pair
    many-to-many through the shared ref (``pair_stores`` rule 3). All captions of one image in one modality carry
    identical tokens, so any head embeds them identically and a well-aligned run retrieves them all perfectly."""
    gen = torch.Generator().manual_seed(seed)
    # Orthogonal latents: no two images nearly alike, so a short training separates every one of them.
    latent_dim = max(8, n_images)
    latent = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=gen))[0][:n_images] * latent_dim**0.5
    stores = {}
    for modality, per_image, dim, tokens in (("image", 1, 12, 4), ("text", written, 10, 3), ("audio", spoken, 14, 5)):
        to_modality = torch.randn(latent_dim, dim, generator=gen)
        items, metas = [], []
        for i in range(n_images):
            for k in range(per_image):
                items.append((latent[i] @ to_modality).expand(tokens, dim).clone())
                metas.append({"id": f"img{i}"} if modality == "image" else {"id": f"{modality}{i}-{k}", "ref": f"img{i}"})
        identity = {"encoder": {"id": f"{tag}-{modality}-encoder"}, "modality": modality, "layer": -1,
                    "keep": "tokens", "manifest_sha256": f"{tag}-{seed}-{modality}"}
        layout = "fixed" if modality == "image" else "ragged"
        stores[modality] = _write(root / f"{tag}-{modality}", modality, layout, items, metas, dim,
                                  tokens if layout == "fixed" else None, identity)
    return stores
