r"""Linear CKA between paired features, to rank encoder pairs before aligning them (freeze-align, Section 3.1).

freeze-align's finding: encoder pairs whose (mean-pooled) features have a higher linear CKA on paired samples
align more easily. The estimators are pure computation on tensors ``[n, p]`` (row i of both sides = pair i);
:func:`store_cka` reads the stores and writes the reports. Computation is in float64.

- :func:`linear_cka` (Kornblith et al. 2019): with column-centred ``X``, ``Y``,
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, which equals ``tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))``
  for ``K = X X^T``, ``L = Y Y^T``, ``H = I - 11^T / n``. Invariant to orthogonal transforms and isotropic
  scaling of either side, not to anisotropic scaling.
- :func:`minibatch_cka` (Nguyen et al. 2021): ``sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i)
  sum_i HSIC_1(L_i, L_i))`` over minibatches ``i``, with the unbiased estimator ``HSIC_1`` (Song et al. 2012),
  so stores that do not fit in memory can be streamed; its value does not drift with the batch size.
- :func:`cka_matrix` / :func:`rank_pairs`: every pair of two feature sets, and the pairs best first.
- :func:`render_heatmap_png`: the matrix as a PNG heatmap (matplotlib).
- :func:`store_cka`: the ``cka`` command: pooled features of paired items read from stores, every store of one
  modality against every store of the other, ranked and written as JSON + heatmap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.training.pairs import pair_stores
from stores import FeatureStore, OneEncoderError, atomic_write_text


def _as_matrix(x: Any, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [n, features] matrix, got shape {tuple(t.shape)}")
    return t


def _pair(x: Any, y: Any, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples (rows): {x.shape[0]} != {y.shape[0]}")
    if x.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} paired rows, got {x.shape[0]}")
    return x, y


def _centred(x: Tensor) -> tuple[Tensor, float]:
    """Column-centred features and their self-HSIC ``||X^T X||_F`` (the CKA normaliser)."""
    x = x - x.mean(dim=0, keepdim=True)
    return x, float(torch.linalg.matrix_norm(x.T @ x))


def _cka_centred(x: Tensor, x_norm: float, y: Tensor, y_norm: float) -> float:
    if x_norm == 0.0 or y_norm == 0.0:
        # Constant features carry no similarity structure: CKA is undefined, not 0 or 1.
        raise ValueError("CKA is undefined for features that are constant over the samples")
    # Feature-space form: O(n p q) and no n x n Gram matrix, so n can be large.
    return float((y.T @ x).square().sum()) / (x_norm * y_norm)


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of paired features ``x [n, p]`` and ``y [n, q]`` (Kornblith et al. 2019), in [0, 1]."""
    x, y = _pair(x, y)
    return _cka_centred(*_centred(x), *_centred(y))


def _hsic_unbiased(k: Tensor, gram_l: Tensor) -> Tensor:
    """Song et al. (2012) unbiased HSIC of Gram matrices ``[n, n]`` (n >= 4), as used by Nguyen et al."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0.0)
    gram_l = gram_l.clone().fill_diagonal_(0.0)
    trace = (k * gram_l).sum()  # tr(K L) for symmetric K, L
    sums = k.sum() * gram_l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (k.sum(dim=0) @ gram_l.sum(dim=1))  # 1^T K L 1
    return (trace + sums - cross) / (n * (n - 3))


def _hsic_biased(k: Tensor, gram_l: Tensor) -> Tensor:
    """Biased HSIC ``tr(K H L H) / (n - 1)^2``."""
    n = k.shape[0]
    kc = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
    return (kc * gram_l).sum() / (n - 1) ** 2


def minibatch_cka(batches: Iterable[tuple[Any, Any]], unbiased: bool = True) -> float:
    """Linear CKA accumulated over minibatches of paired rows ``(x_i [b_i, p], y_i [b_i, q])``.

    Each minibatch contributes its HSIC estimates with equal weight (Nguyen et al. 2021). With ``unbiased``
    (the default) every batch needs at least 4 rows and the result estimates the population CKA, so it comes
    close to :func:`linear_cka` on all rows at once; the biased estimator drifts with the batch size.
    """
    hsic = _hsic_unbiased if unbiased else _hsic_biased
    xy = xx = yy = 0.0
    count = 0
    for x, y in batches:
        x, y = _pair(x, y, min_rows=4 if unbiased else 2)
        k, gram_l = x @ x.T, y @ y.T
        xy += float(hsic(k, gram_l))
        xx += float(hsic(k, k))
        yy += float(hsic(gram_l, gram_l))
        count += 1
    if count == 0:
        raise ValueError("minibatch_cka needs at least one minibatch")
    if xx <= 0.0 or yy <= 0.0:
        raise ValueError("CKA is undefined: a side has no (estimated) variance; use larger minibatches")
    return xy / math.sqrt(xx * yy)


def minibatch_cka_matrix(
    batches: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]], unbiased: bool = True
) -> tuple[list[str], list[str], Tensor]:
    """:func:`minibatch_cka` of every ``(a, b)`` pair in one pass over the minibatches.

    Each minibatch is ``({name_a: x_i [b_i, p_a]}, {name_b: y_i [b_i, q_b]})`` with the same rows on every side
    and the same names in every batch. Each feature set's Gram matrix is built once per batch, so streaming ``s``
    stores costs one read of each, not one per pair. Returns ``(rows, cols, matrix)`` like :func:`cka_matrix`.
    """
    hsic = _hsic_unbiased if unbiased else _hsic_biased
    rows: list[str] = []
    cols: list[str] = []
    cross: Tensor | None = None
    self_a: Tensor | None = None
    self_b: Tensor | None = None
    for batch_a, batch_b in batches:
        if not batch_a or not batch_b:
            raise ValueError("every minibatch needs at least one feature set on each side")
        if cross is None:
            rows, cols = list(batch_a), list(batch_b)
            cross = torch.zeros(len(rows), len(cols), dtype=torch.float64)
            self_a = torch.zeros(len(rows), dtype=torch.float64)
            self_b = torch.zeros(len(cols), dtype=torch.float64)
        elif list(batch_a) != rows or list(batch_b) != cols:
            raise ValueError("every minibatch must hold the same feature sets in the same order")
        grams = []
        for side, batch in enumerate((batch_a, batch_b)):
            for name, feats in batch.items():
                x = _as_matrix(feats, f"features {name!r}")
                grams.append((side, x.shape[0], x @ x.T))
        if len({n for _, n, _ in grams}) > 1 or grams[0][1] < (4 if unbiased else 2):
            raise ValueError(f"a minibatch needs the same rows (at least {4 if unbiased else 2}) in every feature "
                             f"set; rows: {[n for _, n, _ in grams]}")
        gram_a, gram_b = [g for s, _, g in grams if s == 0], [g for s, _, g in grams if s == 1]
        for i, k in enumerate(gram_a):
            self_a[i] += float(hsic(k, k))
            for j, gram_l in enumerate(gram_b):
                cross[i, j] += float(hsic(k, gram_l))
        for j, gram_l in enumerate(gram_b):
            self_b[j] += float(hsic(gram_l, gram_l))
    if cross is None or self_a is None or self_b is None:
        raise ValueError("minibatch_cka_matrix needs at least one minibatch")
    for names, selves in ((rows, self_a), (cols, self_b)):
        flat = [n for n, v in zip(names, selves.tolist(), strict=True) if v <= 0.0]
        if flat:
            raise ValueError(f"CKA is undefined for {flat}: no (estimated) variance; use larger minibatches")
    return rows, cols, cross / torch.sqrt(self_a[:, None] * self_b[None, :])


def cka_matrix(
    features_a: Mapping[str, Any], features_b: Mapping[str, Any]
) -> tuple[list[str], list[str], Tensor]:
    """Linear CKA of every ``(a, b)`` pair: ``rows`` = names of ``features_a``, ``cols`` = names of ``features_b``.

    Every feature matrix must hold the same ``n`` paired samples in the same order. Each side is centred and
    normalised once, so the cost is one ``p x q`` product per pair. Returns ``matrix [len(rows), len(cols)]``.
    """
    if not features_a or not features_b:
        raise ValueError("cka_matrix needs at least one feature set on each side")
    prepared: dict[tuple[int, str], tuple[Tensor, float]] = {}
    n_rows: dict[str, int] = {}
    for side, features in enumerate((features_a, features_b)):
        for name, feats in features.items():
            x = _as_matrix(feats, f"features {name!r}")
            n_rows[f"{'ab'[side]}:{name}"] = x.shape[0]
            prepared[side, name] = _centred(x)
    if len(set(n_rows.values())) > 1:
        raise ValueError(f"all feature sets must hold the same paired samples; rows per set: {n_rows}")
    rows, cols = list(features_a), list(features_b)
    matrix = torch.empty(len(rows), len(cols), dtype=torch.float64)
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            matrix[i, j] = _cka_centred(*prepared[0, a], *prepared[1, b])
    return rows, cols, matrix


def rank_pairs(rows: Sequence[str], cols: Sequence[str], matrix: Any) -> list[tuple[str, str, float]]:
    """Every ``(row, col, cka)`` of a :func:`cka_matrix` result, highest CKA first (ties keep matrix order)."""
    m = _as_matrix(matrix, "matrix")
    pairs = [(r, c, float(m[i, j])) for i, r in enumerate(rows) for j, c in enumerate(cols)]
    return sorted(pairs, key=lambda p: -p[2])


# ---------------------------------------------------------------- heatmap (matplotlib)

_NAN_COLOUR = (160, 160, 160)


def _viridis():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad=tuple(c / 255 for c in _NAN_COLOUR))


def heatmap_colour(value: float, vmin: float = 0.0, vmax: float = 1.0) -> tuple[int, int, int]:
    """The RGB fill of a cell: matplotlib's viridis from ``vmin`` (dark purple) to ``vmax`` (yellow), clipped; NaN
    is grey."""
    if math.isnan(value):
        return _NAN_COLOUR
    t = min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    return tuple(int(c) for c in _viridis()(t, bytes=True)[:3])  # type: ignore[return-value]  # as imshow rounds


def render_heatmap_png(
    matrix: Any,
    rows: Sequence[str],
    cols: Sequence[str],
    path: str | Path,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cell: tuple[int, int] = (72, 40),
) -> None:
    """Draw ``matrix [len(rows), len(cols)]`` as a labelled heatmap PNG at ``path`` (matplotlib, off-screen).

    Cells are coloured by :func:`heatmap_colour` and carry their value; row labels on the left, column labels
    rotated above, a colour bar on the right. The fixed ``[vmin, vmax] = [0, 1]`` keeps plots comparable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _as_matrix(matrix, "matrix")
    if tuple(m.shape) != (len(rows), len(cols)):
        raise ValueError(f"matrix shape {tuple(m.shape)} does not match {len(rows)} rows x {len(cols)} cols")
    if not vmax > vmin:
        raise ValueError(f"vmax ({vmax}) must be greater than vmin ({vmin})")
    values = m.double().numpy()
    fig, ax = plt.subplots(figsize=(1.5 + cell[0] * len(cols) / 100 + 1.2, 1.0 + cell[1] * max(len(rows), 2) / 100))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=_viridis(), vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            value = float(values[i, j])
            colour = heatmap_colour(value, vmin, vmax)
            light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140  # dark text on light cells
            ax.text(j, i, "nan" if math.isnan(value) else f"{value:.2f}", ha="center", va="center",
                    color="black" if light else "white", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    fig.savefig(str(path), format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- stores -> ranking (the ``cka`` command)


class CKAError(OneEncoderError, ValueError):
    """The stores or pairs given to ``cka`` cannot be compared."""


# Bytes per feature value the full estimator holds at once: the pooled float32 read, its float64 copy, the
# centred float64 copy.
_FULL_BYTES_PER_VALUE = 20
ESTIMATORS = ("auto", "full", "minibatch")


def read_pairs_file(path: str | Path) -> list[tuple[str, str]]:
    """An explicit pairs file: JSONL, one ``{"a": id, "b": id}`` per line (ids as strings or integers).

    ``a`` is an item id of the row modality's stores (image when image is among them), ``b`` one of the other
    modality's. Blank lines are skipped; any bad line is an error naming its line number.
    """
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            problems.append(f"line {number}: invalid JSON ({err})")
            continue
        ids = [record.get(key) if isinstance(record, dict) else None for key in ("a", "b")]
        if any(isinstance(v, bool) or not isinstance(v, (str, int)) or v == "" for v in ids):
            problems.append(f"line {number}: needs an object with ids 'a' and 'b' (strings or integers)")
            continue
        pairs.append((str(ids[0]), str(ids[1])))
    if problems:
        raise CKAError(f"bad pairs file {path}: " + "; ".join(problems[:10])
                       + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
    if not pairs:
        raise CKAError(f"pairs file {path} holds no pairs")
    return pairs


def _names(stores: Sequence[FeatureStore]) -> list[str]:
    """The store folder names, or the full paths when two folders share a name."""
    names = [s.path.name for s in stores]
    return names if len(set(names)) == len(names) else [str(s.path) for s in stores]


def _group(stores: Sequence[FeatureStore]) -> tuple[list[FeatureStore], list[FeatureStore]]:
    """Stores split by modality (from their metadata): rows = image stores when present, else the first store's."""
    seen = list(dict.fromkeys(s.modality for s in stores))
    if len(seen) != 2:
        listed = ", ".join(f"{s.path} ({s.modality})" for s in stores)
        raise CKAError(f"cka compares the stores of two modalities (e.g. image x text); got {len(seen)} modality "
                       f"{'/'.join(seen)}: {listed}")
    first = "image" if "image" in seen else seen[0]
    return [s for s in stores if s.modality == first], [s for s in stores if s.modality != first]


def _default_pairs(anchor: FeatureStore, partner: FeatureStore) -> list[tuple[str, str]]:
    """One pair per anchor item (its first partner in store order), by the rules of :func:`pair_stores`.

    One partner per anchor: CKA treats rows as independent samples, and an image repeated once per caption would
    weigh images by their caption count.
    """
    pairs = pair_stores(anchor, partner)
    order = np.lexsort((pairs.partner, pairs.anchor))
    anchors, partners = pairs.anchor[order], pairs.partner[order]
    _, first = np.unique(anchors, return_index=True)
    return [(anchor.ids[int(anchors[k])], partner.ids[int(partners[k])]) for k in first]


def _row_indices(pairs: list[tuple[str, str]], rows: list[FeatureStore], cols: list[FeatureStore],
                 names: list[str]) -> tuple[list[np.ndarray], list[dict]]:
    """Row indices of the kept pairs in every store (rows stores first), and what was dropped per store.

    A pair is kept only when every store holds both of its ids: every CKA cell must be computed on the same
    samples, or the cells would not be comparable.
    """
    keep = np.ones(len(pairs), dtype=bool)
    dropped, positions = [], []
    for k, store in enumerate([*rows, *cols]):
        side = 0 if k < len(rows) else 1
        index = {item_id: i for i, item_id in enumerate(store.ids)}
        position = np.asarray([index.get(p[side], -1) for p in pairs], dtype=np.int64)
        if (position < 0).any():
            missing = [pairs[i][side] for i in np.flatnonzero(position < 0)]
            dropped.append({"store": names[k], "missing_ids": len(missing), "examples": missing[:5]})
        keep &= position >= 0
        positions.append(position)
    indices = [position[keep] for position in positions]
    return indices, dropped


def store_cka(
    store_paths: Sequence[str | Path],
    pairs_file: str | Path | None = None,
    estimator: str = "minibatch",
    batch_size: int = 1024,
    memory_gb: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict:
    """Linear CKA between the pooled features (:meth:`FeatureStore.pooled`) of paired samples, for every store of
    one modality against every store of the other, ranked best first (freeze-align's encoder-pair selection).

    Pairs come from ``pairs_file`` (:func:`read_pairs_file`) or from the first store of each modality by the
    :func:`pair_stores` rules, one pair per row-modality item; pairs whose ids are missing from some store are
    dropped (reported). ``estimator``: ``minibatch`` (the default: :func:`minibatch_cka_matrix`, unbiased,
    streamed in shuffled batches of ``batch_size``; one batch when the pairs fit in one), ``full``
    (:func:`cka_matrix`, the biased estimator, everything in memory), or ``auto``: full when the pooled features fit
    in ``memory_gb`` (default: the store RAM budget). The biased estimator is not the default: with fewer pairs than
    feature dimensions it scores unrelated features high (Gaussian noise against real text features: about 0.5 on a
    few hundred pairs, docs/evaluation.md), which drowns the ranking the command exists for.

    Beside each cell the report gives its noise baseline (``noise_matrix``; ``noise`` in the ranking): the same
    estimator on the same pairs with the row store replaced by seeded Gaussian noise of its width. A pair worth
    aligning clears it by a clear margin. With ``out``, writes ``cka.json`` and the heatmap ``cka.png`` there.
    """
    if estimator not in ESTIMATORS:
        raise CKAError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
    stores = _open_distinct(store_paths)
    rows, cols = _group(stores)
    names = _names([*rows, *cols])
    indices, dropped, source = _paired_rows(rows, cols, names, pairs_file)
    n = len(indices[0])
    chosen = _estimator_for(estimator, n, sum(s.dim for s in stores), memory_gb)
    features = list(zip(names, [*rows, *cols], indices, strict=True))
    # The noise baseline: one Gaussian "store" per row store, its width, rows drawn once for all n pairs.
    noise_gen = torch.Generator().manual_seed(seed)
    noise = {f"noise:{name}": torch.randn(n, store.dim, generator=noise_gen, dtype=torch.float64)
             for name, store in zip(names[: len(rows)], rows, strict=True)}
    keys = ([*names[: len(rows)], *noise], names[len(rows):])
    if chosen == "full":
        row_names, col_names, matrix = _full_cka(features, noise, keys, n)
    else:
        row_names, col_names, matrix = _minibatch_cka(features, noise, keys, n, batch_size, seed)
    matrix = torch.as_tensor(matrix)
    row_names, matrix, noise_matrix = row_names[: len(rows)], matrix[: len(rows)], matrix[len(rows):]
    ranking = rank_pairs(row_names, col_names, matrix)
    noise_of = {(a, b): float(noise_matrix[i, j]) for i, a in enumerate(row_names) for j, b in enumerate(col_names)}
    report: dict[str, Any] = {
        "task": "cka",
        "estimator": chosen,
        "batch_size": batch_size if chosen == "minibatch" else None,
        "pairs": n,
        "pairs_source": source,
        "dropped": dropped,
        "rows": {"modality": rows[0].modality,
                 "stores": [_describe(s, k) for s, k in zip(rows, names[: len(rows)], strict=True)]},
        "cols": {"modality": cols[0].modality,
                 "stores": [_describe(s, k) for s, k in zip(cols, names[len(rows):], strict=True)]},
        "matrix": matrix.tolist(),
        "noise_matrix": noise_matrix.tolist(),
        "ranking": [{"rank": r + 1, rows[0].modality: a, cols[0].modality: b, "cka": v, "noise": noise_of[a, b]}
                    for r, (a, b, v) in enumerate(ranking)],
    }
    if out is not None:
        _write_cka(Path(out), report, matrix, row_names, col_names)
    return report


def _open_distinct(store_paths: Sequence[str | Path]) -> list[FeatureStore]:
    from stores import is_url

    resolved = [str(p) if is_url(p) else Path(p).resolve() for p in store_paths]
    repeated = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if repeated:
        raise CKAError(f"store given twice: {', '.join(repeated)}")
    return [FeatureStore.open(p) for p in store_paths]


def _paired_rows(rows: list[FeatureStore], cols: list[FeatureStore], names: list[str],
                 pairs_file: str | Path | None) -> tuple[list[np.ndarray], list[dict], str]:
    """Each store's rows of the pairs every store holds, the pairs dropped (by store) and where the pairs came
    from; at least 4 pairs or a :class:`CKAError`."""
    if pairs_file is not None:
        pairs, source = read_pairs_file(pairs_file), str(pairs_file)
    else:
        pairs = _default_pairs(rows[0], cols[0])
        source = f"pair_stores({rows[0].path}, {cols[0].path}), one pair per {rows[0].modality} item"
    indices, dropped = _row_indices(pairs, rows, cols, names)
    n = len(indices[0])
    if n < 4:
        detail = "; ".join(f"{d['store']} lacks {d['missing_ids']} ids, e.g. {d['examples']}" for d in dropped)
        raise CKAError(f"only {n} pairs are held by every store (CKA needs at least 4)" + (f": {detail}" if detail
                                                                                              else ""))
    return indices, dropped, source


def _estimator_for(estimator: str, n: int, total_dim: int, memory_gb: float | None) -> str:
    """``estimator``, or for ``auto`` full when ``n`` pooled rows of every store fit in ``memory_gb``."""
    from stores import DEFAULT_RAM_BUDGET_GB

    need = n * total_dim * _FULL_BYTES_PER_VALUE
    budget = (DEFAULT_RAM_BUDGET_GB if memory_gb is None else memory_gb) * (1 << 30)
    return estimator if estimator != "auto" else ("full" if need <= budget else "minibatch")


def _full_cka(features: list, noise: dict[str, torch.Tensor], keys: tuple[list[str], list[str]], n: int):
    """:func:`cka_matrix` of every row key (stores and noise) against every column store, all ``n`` pairs at once."""
    pooled = {name: store.pooled(idx) for name, store, idx in features}
    constant = [name for name, x in pooled.items() if not bool((x != x[:1]).any())]
    if constant:
        raise CKAError(f"CKA is undefined for {', '.join(constant)}: its pooled features are the same for every "
                       f"one of the {n} paired items")
    pooled.update(noise)
    return cka_matrix({k: pooled[k] for k in keys[0]}, {k: pooled[k] for k in keys[1]})


def _minibatch_cka(features: list, noise: dict[str, torch.Tensor], keys: tuple[list[str], list[str]], n: int,
                   batch_size: int, seed: int):
    """:func:`minibatch_cka_matrix` over shuffled batches of ``batch_size`` pairs."""
    if batch_size < 4:
        raise CKAError(f"--batch-size must be at least 4 for the unbiased minibatch estimator, got {batch_size}")
    # Shuffled batches: the unbiased HSIC of a batch estimates the population value only if the batch is a
    # random sample (store order is often sorted by class or source).
    order = np.random.default_rng(seed).permutation(n)
    chunks = np.array_split(order, max(1, n // batch_size))

    def batches():
        for chunk in chunks:
            pooled = {name: store.pooled(idx[chunk]) for name, store, idx in features}
            pooled.update({k: v[torch.from_numpy(chunk)] for k, v in noise.items()})
            yield ({k: pooled[k] for k in keys[0]}, {k: pooled[k] for k in keys[1]})

    try:
        return minibatch_cka_matrix(batches())
    except ValueError as err:
        raise CKAError(f"minibatch CKA failed: {err}") from None


def _describe(store: FeatureStore, name: str) -> dict:
    encoder = (store.identity.get("encoder") or {}).get("id") or (store.meta.summary or {}).get("encoder_spec")
    return {"name": name, "path": str(store.path), "encoder": encoder, "dim": store.dim, "key": store.key,
            "items": len(store)}


def _write_cka(out: Path, report: dict, matrix: torch.Tensor, row_names: list[str], col_names: list[str]) -> None:
    """``cka.json``, ``cka.md`` and the heatmap ``cka.png`` in ``out`` (their paths recorded in ``report``)."""
    out.mkdir(parents=True, exist_ok=True)
    report["json_path"], report["png_path"] = str(out / "cka.json"), str(out / "cka.png")
    report["md_path"] = str(out / "cka.md")
    rows, cols = report["rows"]["modality"], report["cols"]["modality"]
    render_heatmap_png(matrix, row_names, col_names, out / "cka.png",
                       title=f"linear CKA ({report['estimator']}), {report['pairs']} pairs: {rows} x {cols}")
    atomic_write_text(out / "cka.json", json.dumps(report, indent=2))
    atomic_write_text(out / "cka.md", ranking_markdown(report))


def ranking_markdown(report: dict) -> str:
    """The ranking of a :func:`store_cka` report as a Markdown table, best pair first."""
    a, b = report["rows"]["modality"], report["cols"]["modality"]
    lines = [f"# Linear CKA, {report['pairs']} pairs ({report['estimator']} estimator)", "",
             f"| rank | {a} | {b} | CKA | noise baseline |", "| ---: | --- | --- | ---: | ---: |"]
    lines += [f"| {r['rank']} | {r[a]} | {r[b]} | {r['cka']:.4f} | {r['noise']:.4f} |" for r in report["ranking"]]
    return "\n".join(lines) + "\n"


def format_ranking(report: dict) -> str:
    """The ranking of a :func:`store_cka` report as a plain-text table, best pair first."""
    a, b = report["rows"]["modality"], report["cols"]["modality"]
    width_a = max([len(a), *(len(r[a]) for r in report["ranking"])]) + 2
    width_b = max([len(b), *(len(r[b]) for r in report["ranking"])]) + 2
    lines = [f"linear CKA on {report['pairs']} pairs ({report['estimator']} estimator; pairs: "
             f"{report['pairs_source']})"]
    for d in report["dropped"]:
        lines.append(f"dropped pairs: {d['store']} lacks {d['missing_ids']} paired ids, e.g. {d['examples']}")
    lines.append(f"{'rank':>4}  {a:<{width_a}}{b:<{width_b}}{'CKA':>7}  {'noise':>7}")
    lines += [f"{r['rank']:>4}  {r[a]:<{width_a}}{r[b]:<{width_b}}{r['cka']:>7.4f}  {r['noise']:>7.4f}"
              for r in report["ranking"]]
    lines.append(f"noise: the same estimator with the {a} store replaced by Gaussian noise of its width; a pair worth "
                 "aligning clears it by a clear margin")
    if "json_path" in report:
        lines.append(f"report: {report['json_path']}\nheatmap: {report['png_path']}")
    return "\n".join(lines)
