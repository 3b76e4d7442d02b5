r"""Contrastive losses for paired embeddings ``a [K, W]`` (e.g. image) and ``b [K, W]`` (e.g. text).

Both are L2-normalised inside, so every similarity below is a cosine similarity. ``tau`` is a temperature stored
as ``log_temperature`` and clamped into ``[min_temperature, max_temperature]`` where it is used, with the
gradient of the unclamped value (a straight-through clamp), and kept in bounds by ``clamp_temperature_`` after each
optimiser step.

``kind="infonce"`` (CLIP; what the OneEncoder reference code trains with)::

    logits = S_ab / tau,  S_ab[i, j] = cos(a_i, b_j)
    L = (CE(logits, arange(K)) + CE(logits^T, arange(K))) / 2

``kind="soft"`` (the paper's eqs 4-8, OneEncoder Section III-B)::

    l_ij = -log softmax_k(S_ab[i, k] / tau)[j]         (eq 4, image i against all texts; row softmax)
    l_ji = -log softmax_k(S_ab[k, j] / tau)[i]         (eq 5, text j against all images; column softmax)
    M    = (S_aa + S_bb) / 2                           (intra-modal cosine similarities, symmetric)
    T    = softmax_row(M / tau)                        (eq 6: t_ij = T[i, j]; eq 7: t_ji = T[j, i])
    L    = 1 / (2K) * sum_i sum_j (t_ij * l_ij + t_ji * l_ji)                              (eq 8)

Reading of tau: the paper prints the target exponent as ``(...)/2 · tau``; it comes from a CLIP tutorial whose
targets are ``softmax((I I^T + T T^T) / 2 * tau)`` with tau = 1. Multiplying by a temperature that eq 4-5 divide
by is inconsistent, so this module DIVIDES by tau in the targets as well (one temperature, one meaning).

Known weakness of the literal soft form: at initialisation the projected embeddings are nearly collinear, so
``T`` is close to uniform and carries almost no pairing signal (measured: much worse than InfoNCE on a small real
set). Remedies, all off by default so that ``kind="soft"`` alone is the paper:

- ``target_mix`` (lambda in [0, 1]): targets ``(1 - lambda) T + lambda I``; lambda = 1 is exactly InfoNCE. It is a
  plain attribute, so a fit loop can schedule it (e.g. a one-hot warm-up decaying to soft targets).
- ``a_target_feats`` / ``b_target_feats`` in ``forward``: compute ``S_aa`` / ``S_bb`` from these features (e.g.
  the frozen encoders' pooled features, any dim) instead of from the projected embeddings.
- ``detach_targets``: no gradient flows through ``T`` (neither to the embeddings nor to tau).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_KINDS = ("soft", "infonce")


class ContrastiveLoss(nn.Module):
    """Symmetric contrastive loss with a (learnable, clamped) temperature; see the module docstring."""

    def __init__(
        self,
        kind: str = "soft",
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        target_mix: float = 0.0,
        detach_targets: bool = False,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
        if not 0.0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "need 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"{min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.kind = kind
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.target_mix = float(target_mix)
        self.detach_targets = bool(detach_targets)
        log_t = torch.tensor(math.log(init_temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            # A buffer, so a fixed temperature is still saved with the checkpoint but never optimised.
            self.register_buffer("log_temperature", log_t)

    def _tau(self) -> Tensor:
        # Straight-through clamp: the value stays in bounds, but the gradient is that of the unclamped temperature,
        # so a temperature at a bound still learns to leave it (a plain clamp gives it zero gradient there).
        # ``clamp_temperature_`` after each optimiser step keeps the parameter itself in bounds (open_clip's way).
        # In log space: far past a bound, tau + (clamped - tau) would cancel to nothing in float32.
        log_t = self.log_temperature
        bounded = log_t.clamp(math.log(self.min_temperature), math.log(self.max_temperature))
        return (log_t + (bounded - log_t).detach()).exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the stored temperature into ``[min_temperature, max_temperature]`` in place; call it after every
        optimiser step, so the parameter never drifts past a bound while its clamped value is in use."""
        self.log_temperature.clamp_(math.log(self.min_temperature), math.log(self.max_temperature))

    @property
    def temperature(self) -> float:
        return float(self._tau().detach())

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        a_target_feats: Tensor | None = None,
        b_target_feats: Tensor | None = None,
    ) -> Tensor:
        """Loss for K pairs ``(a[i], b[i])``. Target features are used by ``soft`` only (ignored by infonce)."""
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
            raise ValueError(f"expected a [K, W] and b [K, W], got {tuple(a.shape)} and {tuple(b.shape)}")
        if not 0.0 <= self.target_mix <= 1.0:
            raise ValueError(f"target_mix must be in [0, 1], got {self.target_mix}")
        k = a.shape[0]
        # Similarities in float32 even under autocast / bf16 embeddings: the softmaxes are sharp at tau ~ 0.01.
        a_n = F.normalize(a.float(), dim=-1)
        b_n = F.normalize(b.float(), dim=-1)
        tau = self._tau()
        logits = a_n @ b_n.T / tau
        labels = torch.arange(k, device=a.device)
        if self.kind == "infonce":
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        targets = self._soft_targets(a_n, b_n, a_target_feats, b_target_feats, tau)
        if self.target_mix > 0.0:
            eye = torch.eye(k, device=a.device, dtype=targets.dtype)
            targets = (1.0 - self.target_mix) * targets + self.target_mix * eye
        l_ab = -F.log_softmax(logits, dim=1)  # l_ab[i, j] = l_ij (eq 4)
        l_ba = -F.log_softmax(logits, dim=0)  # l_ba[i, j] = l_ji (eq 5)
        return ((targets * l_ab).sum() + (targets.T * l_ba).sum()) / (2 * k)

    def _soft_targets(
        self,
        a_n: Tensor,
        b_n: Tensor,
        a_target_feats: Tensor | None,
        b_target_feats: Tensor | None,
        tau: Tensor,
    ) -> Tensor:
        k = a_n.shape[0]
        for name, feats in (("a_target_feats", a_target_feats), ("b_target_feats", b_target_feats)):
            if feats is not None and (feats.dim() != 2 or feats.shape[0] != k):
                raise ValueError(f"{name} must be [K={k}, D], got {tuple(feats.shape)}")
        ta = a_n if a_target_feats is None else F.normalize(a_target_feats.float(), dim=-1)
        tb = b_n if b_target_feats is None else F.normalize(b_target_feats.float(), dim=-1)
        mean_sim = (ta @ ta.T + tb @ tb.T) / 2
        targets = torch.softmax(mean_sim / tau, dim=1)  # T[i, j] = t_ij (eq 6); t_ji = T[j, i] (eq 7)
        return targets.detach() if self.detach_targets else targets
