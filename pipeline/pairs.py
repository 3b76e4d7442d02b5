"""Which items of two stores are pairs, the train/validation split, and the minibatches of an epoch.

Pairs come from ``ref``: an item of one store names the id of its partner in the other (a caption's ``ref`` is its
image), or two items name the same id; without refs, items pair by equal id (see :func:`pair_stores`). An anchor item (an image) may have several partners
(captions); by default each epoch sees every anchor once with one partner drawn at random, so a minibatch never holds
two captions of the same image (they would be counted as each other's negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stores import FeatureStore


class PairingError(ValueError):
    """The two stores cannot be paired as asked."""


@dataclass(frozen=True)
class Pairs:
    """Index pairs ``(anchor[k], partner[k])`` into an anchor store and a partner store."""

    anchor: np.ndarray
    partner: np.ndarray

    def __len__(self) -> int:
        return len(self.anchor)

    def subset(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.anchor[mask], self.partner[mask])

    @property
    def anchors(self) -> np.ndarray:
        """Distinct anchor indices, sorted."""
        return np.unique(self.anchor)


def pair_stores(anchor: FeatureStore, partner: FeatureStore) -> Pairs:
    """Pairs between two stores. The first rule that matches anything wins:

    1. a partner's ``ref`` is an anchor id (a caption names its image);
    2. an anchor's ``ref`` is a partner id;
    3. both items ``ref`` the same id (a spoken and a written caption of one image): used for transitive pairs;
    4. equal ids (e.g. a LibriSpeech utterance and its transcript).

    A rule that matches some items but leaves others dangling is an error naming them: the stores were probably
    extracted from manifests that do not belong together.
    """
    rules = (
        lambda: _match(partner, anchor._index, lambda j, i: (i, j)),
        lambda: _match(anchor, partner._index, lambda i, j: (i, j)),
        lambda: _shared_refs(anchor, partner),
    )
    for rule in rules:
        pairs = rule()
        if pairs is not None:
            return pairs
    shared = [i for i, item_id in enumerate(anchor.ids) if item_id in partner._index]
    if not shared:
        raise PairingError(
            f"no pairs between {anchor.path} and {partner.path}: no 'ref' of one names an id of the other, they "
            "share no 'ref' target, and no ids are equal"
        )
    return Pairs(np.asarray(shared), np.asarray([partner.index_of(anchor.ids[i]) for i in shared]))


def check_pivot_refs(new: FeatureStore, pivot: FeatureStore) -> None:
    """Refuse a new modality whose items ``ref`` pivot *items* that themselves ``ref`` a third modality's items
    (a spoken caption naming its written caption, which names the image).

    Such a store trains against the pivot, but it could never be evaluated against that third modality: pairs
    are one ref deep (:func:`pair_stores`), and the new items share no ref with the third modality's items. The
    error says how to write the manifest instead: ref what the pivot item refs (the image), so the new items pair
    with the pivot through the shared ref and with the third modality directly.
    """
    if new.refs is None or pivot.refs is None:
        return
    for i, ref in enumerate(new.refs):
        j = pivot._index.get(ref) if ref is not None else None
        if j is not None and pivot.refs[j] is not None:
            raise PairingError(
                f"{new.path}: item {new.ids[i]!r} refs {pivot.modality} item {ref!r}, which itself refs "
                f"{pivot.refs[j]!r}; {new.modality} would train but could never be paired with what {ref!r} refs "
                f"(pairs are one ref deep). Write ref {pivot.refs[j]!r} (the item the {pivot.modality} refs) in the "
                f"{new.modality} manifest instead: it then pairs with the {pivot.modality} through the shared ref"
            )


def _match(referring: FeatureStore, target_index: dict[str, int], order) -> Pairs | None:
    """Pairs from ``referring``'s refs into ``target_index``; None when no ref resolves at all."""
    if referring.refs is None:
        return None
    found, missing = [], []
    for i, ref in enumerate(referring.refs):
        if ref is None:
            continue
        j = target_index.get(ref)
        if j is None:
            missing.append((referring.ids[i], ref))
        else:
            found.append(order(i, j))
    if not found:
        return None
    if missing:
        shown = ", ".join(f"{a!r} -> {b!r}" for a, b in missing[:5])
        raise PairingError(
            f"{len(missing)} items of {referring.path} refer to ids absent from the other store (e.g. {shown}); "
            "were both stores extracted from matching manifests?"
        )
    anchor_idx, partner_idx = zip(*found, strict=True)
    return Pairs(np.asarray(anchor_idx), np.asarray(partner_idx))


def _shared_refs(anchor: FeatureStore, partner: FeatureStore) -> Pairs | None:
    if anchor.refs is None or partner.refs is None:
        return None
    by_ref: dict[str, list[int]] = {}
    for j, ref in enumerate(partner.refs):
        if ref is not None:
            by_ref.setdefault(ref, []).append(j)
    found = [(i, j) for i, ref in enumerate(anchor.refs) if ref is not None for j in by_ref.get(ref, [])]
    if not found:
        return None
    anchor_idx, partner_idx = zip(*found, strict=True)
    return Pairs(np.asarray(anchor_idx), np.asarray(partner_idx))


def split_by_anchor(pairs: Pairs, val_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Split so that all partners of an anchor fall on the same side (no caption of a val image is trained on)."""
    anchors = pairs.anchors
    n_val = int(round(len(anchors) * val_fraction))
    if val_fraction > 0 and n_val < 2:
        raise PairingError(
            f"--val-fraction {val_fraction} leaves {n_val} validation anchors out of {len(anchors)}; need at least 2"
        )
    rng = np.random.default_rng(seed)
    val_anchors = rng.choice(anchors, size=n_val, replace=False) if n_val else np.zeros(0, dtype=np.int64)
    in_val = np.isin(pairs.anchor, val_anchors)
    return pairs.subset(~in_val), pairs.subset(in_val)


def epoch_steps(pairs: Pairs, batch_size: int, sampling: str = "one-per-anchor") -> int:
    """How many minibatches :func:`epoch_batches` yields per epoch (for progress bars and the metrics log)."""
    n = len(pairs.anchors) if sampling == "one-per-anchor" else len(pairs)
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


def epoch_batches(pairs: Pairs, batch_size: int, generator: torch.Generator, sampling: str = "one-per-anchor"):
    """Minibatches ``(anchor_idx, partner_idx)`` of one epoch, in a random order fixed by ``generator``.

    ``one-per-anchor``: each anchor once, with one of its partners drawn at random. ``all``: every pair once (an
    anchor may then appear twice in a batch). A last batch of fewer than 2 pairs is dropped: it has no negatives.
    """
    if sampling == "one-per-anchor":
        order = torch.randperm(len(pairs), generator=generator).numpy()
        anchor, partner = pairs.anchor[order], pairs.partner[order]
        _, first = np.unique(anchor, return_index=True)  # first occurrence after shuffling = a random partner
        chosen = first[torch.randperm(len(first), generator=generator).numpy()]
        anchor, partner = anchor[chosen], partner[chosen]
    elif sampling == "all":
        order = torch.randperm(len(pairs), generator=generator).numpy()
        anchor, partner = pairs.anchor[order], pairs.partner[order]
    else:
        raise ValueError(f"sampling must be 'one-per-anchor' or 'all', not {sampling!r}")
    for start in range(0, len(anchor), batch_size):
        if len(anchor) - start >= 2:
            yield anchor[start : start + batch_size], partner[start : start + batch_size]
