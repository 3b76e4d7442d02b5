"""Which items of two stores are pairs, the train/validation split, and the minibatches of an epoch.

Pairs come from ``ref``: an item of one store names the id of its partner in the other (a caption's ``ref`` is its
image), or two items name the same id; without refs, items pair by equal id (see :func:`pair_stores`). An anchor item
(an image) may have several partners (captions), and with shared refs a partner may have several anchors too (the
spoken and the written captions of one image); by default each epoch sees every anchor once with one partner drawn at
random, so a minibatch never holds two captions of the same image (they would be counted as each other's negatives).
Retrieval ranks distinct items and reads the pairs as a many-to-many relevance (:meth:`Pairs.relevance`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from stores import FeatureStore, OneEncoderError


class PairingError(OneEncoderError, ValueError):
    """The two stores cannot be paired as asked."""


@dataclass(frozen=True)
class Relevance:
    """Which distinct items of two stores are relevant to each other, for retrieval.

    Rows are the distinct anchor items ``anchors`` (store indices, sorted), columns the distinct partner items
    ``partners``; ``(anchor_pos[k], partner_pos[k])`` are the positions of the k-th relevant pair, each pair once.
    Every row and every column has at least one relevant item on the other side."""

    anchors: np.ndarray
    partners: np.ndarray
    anchor_pos: np.ndarray
    partner_pos: np.ndarray

    def dense(self) -> torch.Tensor:
        """The relevance as a bool matrix ``[len(anchors), len(partners)]`` (for small sets: tests, sheets)."""
        matrix = torch.zeros(len(self.anchors), len(self.partners), dtype=torch.bool)
        matrix[torch.from_numpy(self.anchor_pos), torch.from_numpy(self.partner_pos)] = True
        return matrix

    def chance_at_1(self) -> tuple[float, float]:
        """R@1 of a random ranking, anchors -> partners and partners -> anchors: the mean over queries of their
        relevant items over the gallery size."""
        per_anchor = np.bincount(self.anchor_pos, minlength=len(self.anchors))
        per_partner = np.bincount(self.partner_pos, minlength=len(self.partners))
        return float(per_anchor.mean() / len(self.partners)), float(per_partner.mean() / len(self.anchors))


@dataclass(frozen=True)
class Pairs:
    """Index pairs ``(anchor[k], partner[k])`` into an anchor store and a partner store.

    ``group[k]`` labels the connected group of items the pair belongs to (an image and all its captions; every
    spoken and written caption of one image): the train/validation split keeps a group on one side. ``None``: each
    anchor with its partners is a group. ``dropped``: the ``(id, ref)`` of items of the store ``dropped_from`` whose
    ``ref`` names an id absent from the other store (left out by ``pair_stores(..., absent="drop")``, e.g. because
    that item failed extraction)."""

    anchor: np.ndarray
    partner: np.ndarray
    group: np.ndarray | None = None
    dropped: tuple[tuple[str, str], ...] = ()
    dropped_from: str | None = None

    def __len__(self) -> int:
        return len(self.anchor)

    def subset(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.anchor[mask], self.partner[mask], None if self.group is None else self.group[mask])

    @property
    def anchors(self) -> np.ndarray:
        """Distinct anchor indices, sorted."""
        return np.unique(self.anchor)

    @property
    def groups(self) -> np.ndarray:
        """The group label of each pair (the anchor index where no groups were given)."""
        return self.anchor if self.group is None else self.group

    def relevance(self) -> Relevance:
        """The pairs as a relevance between distinct items: an item paired several times is one row or column."""
        anchors, anchor_pos = np.unique(self.anchor, return_inverse=True)
        partners, partner_pos = np.unique(self.partner, return_inverse=True)
        unique = np.unique(np.stack([anchor_pos.ravel(), partner_pos.ravel()]), axis=1)
        return Relevance(anchors, partners, unique[0].astype(np.int64), unique[1].astype(np.int64))


ABSENT_PARTNERS = ("error", "drop")


def pair_stores(anchor: FeatureStore, partner: FeatureStore, absent: str = "error") -> Pairs:
    """Pairs between two stores. The first rule that matches anything wins:

    1. a partner's ``ref`` is an anchor id (a caption names its image);
    2. an anchor's ``ref`` is a partner id;
    3. both items ``ref`` the same id (a spoken and a written caption of one image): used for transitive pairs;
    4. equal ids (e.g. a LibriSpeech utterance and its transcript).

    A rule that matches some items but leaves others dangling (their ``ref`` names an id the other store lacks, e.g.
    an image that failed extraction): ``absent="error"`` refuses, naming them; ``"drop"`` leaves them out and lists
    them in :attr:`Pairs.dropped`.
    """
    if absent not in ABSENT_PARTNERS:
        raise ValueError(f"absent must be one of {', '.join(ABSENT_PARTNERS)}, not {absent!r}")
    rules = (
        lambda: _match(partner, anchor._index, lambda j, i: (i, j), absent),
        lambda: _grouped_by_partner(_match(anchor, partner._index, lambda i, j: (i, j), absent)),
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


def _match(referring: FeatureStore, target_index: dict[str, int], order, absent: str) -> Pairs | None:

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
    if missing and absent == "error":
        shown = ", ".join(f"{a!r} -> {b!r}" for a, b in missing[:5])
        raise PairingError(
            f"{len(missing)} items of {referring.path} refer to ids absent from the other store (e.g. {shown}); "
            "were both stores extracted from matching manifests?"
        )
    anchor_idx, partner_idx = zip(*found, strict=True)
    return Pairs(np.asarray(anchor_idx), np.asarray(partner_idx), dropped=tuple(missing),
                 dropped_from=str(referring.path) if missing else None)


def _grouped_by_partner(pairs: Pairs | None) -> Pairs | None:
    """Anchors that name one partner form one group with it (the captions of one image, when captions anchor)."""
    return None if pairs is None else dataclasses.replace(pairs, group=pairs.partner)


def _shared_refs(anchor: FeatureStore, partner: FeatureStore) -> Pairs | None:
    if anchor.refs is None or partner.refs is None:
        return None
    by_ref: dict[str, list[int]] = {}
    for j, ref in enumerate(partner.refs):
        if ref is not None:
            by_ref.setdefault(ref, []).append(j)
    group_of = {ref: g for g, ref in enumerate(sorted(by_ref))}
    found = [(i, j, group_of[ref]) for i, ref in enumerate(anchor.refs) if ref is not None for j in by_ref.get(ref, [])]
    if not found:
        return None
    anchor_idx, partner_idx, group = zip(*found, strict=True)
    return Pairs(np.asarray(anchor_idx), np.asarray(partner_idx), np.asarray(group))


def split_by_anchor(pairs: Pairs, val_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Split so that every pair of a group falls on the same side (no caption of a val image is trained on, nor
    a spoken caption of it when spoken and written captions pair through their shared image)."""
    groups = np.unique(pairs.groups)
    n_val = int(round(len(groups) * val_fraction))
    if val_fraction > 0 and n_val < 2:
        raise PairingError(
            f"--val-fraction {val_fraction} leaves {n_val} validation anchors (or groups of items sharing a ref) out "
            f"of {len(groups)}; need at least 2"
        )
    rng = np.random.default_rng(seed)
    val_groups = rng.choice(groups, size=n_val, replace=False) if n_val else np.zeros(0, dtype=np.int64)
    in_val = np.isin(pairs.groups, val_groups)
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
