"""What every projection head shares: config plumbing, the ``encode`` contract, masked pooling, step-2 freezing.

A head maps frozen-encoder tokens ``[B, L, D_m]`` (or pooled ``[B, D_m]``) of modality ``m`` plus a mask
``[B, L]`` (True = real token) to an embedding ``[B, W]``. Subclasses of :class:`Head` implement only
``_encode`` (inputs already validated, padding already zeroed), ``_modality_prefixes`` (which parameters belong
to one modality) and ``_build_modality`` (the modules a new modality needs); the rest lives here once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def check_name(name: str) -> None:
    # Modality names become ModuleDict / ParameterDict keys and state_dict key parts: no dots, no spaces.
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"modality name must match {_NAME.pattern!r}, got {name!r}")


def normalise_modalities(
    input_dims: dict[str, int], adapters: dict[str, str], kinds: tuple[str, ...], default: str
) -> tuple[dict[str, int], dict[str, str]]:
    """Validate ``input_dims`` and per-modality layer kinds; every modality gets a kind (``default`` if unset)."""
    dims = {str(k): int(v) for k, v in input_dims.items()}
    for name, dim in dims.items():
        check_name(name)
        if dim < 1:
            raise ValueError(f"input dim of {name!r} must be >= 1, got {dim}")
    unknown = set(adapters) - set(dims)
    if unknown:
        raise ValueError(f"adapters given for modalities without an input dim: {sorted(unknown)}")
    out = {m: str(adapters.get(m, default)) for m in dims}
    for name, kind in out.items():
        if kind not in kinds:
            raise ValueError(f"adapter kind of {name!r} must be one of {kinds}, got {kind!r}")
    return dims, out


def check_dropout(dropout: float, name: str = "dropout") -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout}")


class ConfigMixin:
    """``to_dict`` / ``from_dict`` for head config dataclasses (saved as JSON in the run directory)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            # A typo in a saved config must not silently fall back to a default.
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()})


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, L, W]`` over the positions where ``mask [B, L]`` is True; a row with none gives zeros."""
    keep = mask.unsqueeze(-1)
    # where (not multiply): a non-finite value at a padded position must not turn into NaN via 0 * inf.
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    count = keep.sum(dim=1).clamp(min=1).to(x.dtype)
    return total / count


FEATURE_POOLS = ("mean", "query")


def check_feature_pool(kind: str, name: str = "pool") -> None:
    if kind not in FEATURE_POOLS:
        raise ValueError(f"{name} must be one of {FEATURE_POOLS}, got {kind!r}")


class FeaturePool(nn.Module):
    """Pools a frozen encoder's real tokens ``x [B, L, D]`` into ``[B, D]``: ``mean`` (the masked mean, no
    parameters) or ``query`` (attention pooling: the tokens weighted by ``softmax(x . q)``, one learned ``q [D]``).

    The query starts at zero, so the weights start uniform and a ``query`` pool starts as the mean (drawing no
    random numbers); training moves the weight toward the tokens that tell items apart, such as an object's cells
    rather than the background around it. A row with no real token gives zeros either way.
    """

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        check_feature_pool(kind)
        self.kind = kind
        if kind == "query":
            self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.kind == "mean":
            return masked_mean(x, mask)
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        scores = x @ self.query.to(x.dtype)  # under autocast: a lower precision than x
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1) * mask.to(scores.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return torch.einsum("bl,bld->bd", weights, x)


def first_real_index(mask: Tensor) -> Tensor:
    """Index of the first True per row (argmax returns the first maximum), so left padding is handled too."""
    return mask.to(torch.int8).argmax(dim=1)


def prepare_tokens(tokens: Tensor, mask: Tensor | None, in_dim: int, modality: str) -> tuple[Tensor, Tensor]:
    """Check shapes, turn pooled ``[B, D]`` into ``[B, 1, D]``, default the mask, zero the padded positions."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(1)  # a pooled feature is a sequence of one token
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, L, D] or [B, D], got shape {tuple(tokens.shape)}")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    mask = mask.to(device=tokens.device, dtype=torch.bool)
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    if tokens.shape[-1] != in_dim:
        raise ValueError(f"{modality!r} tokens have dim {tokens.shape[-1]}, the head expects {in_dim}")
    # Zero padding first: garbage (even NaN) there would otherwise reach attention values or weight gradients.
    return tokens.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def freeze_except(module: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Make trainable exactly the parameters named ``p`` or ``p.*`` for a prefix ``p``; return their names."""
    names = []
    for name, param in module.named_parameters():
        keep = any(name == p or name.startswith(p + ".") for p in prefixes)
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


class Head(nn.Module):
    """Base class of the registered heads (see ``project.heads``).

    Subclasses set ``config_class``, ``al_kinds`` (kinds ``add_modality`` accepts, first = default) and
    ``self.config`` (a dataclass with ``input_dims`` and ``adapters``), and implement ``_encode``,
    ``_modality_prefixes`` and ``_build_modality``.
    """

    config_class: ClassVar[type]
    al_kinds: ClassVar[tuple[str, ...]] = ("linear", "mlp")
    config: Any

    @classmethod
    def from_config(cls, config: Any) -> Any:
        return cls(config)  # type: ignore[call-arg]

    @property
    def modalities(self) -> list[str]:
        return list(self.config.input_dims)

    def encode(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embed frozen-encoder tokens ``[B, L, D]`` (or pooled ``[B, D]``) with ``mask [B, L]`` -> ``[B, W]``.

        ``mask`` marks real tokens with True; ``None`` means every position is real. Not normalised.
        """
        if modality not in self.config.input_dims:
            raise KeyError(f"unknown modality {modality!r}; known: {self.modalities}")
        tokens, mask = prepare_tokens(tokens, mask, self.config.input_dims[modality], modality)
        return self._encode(modality, tokens, mask)

    def training_embeddings(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """The embeddings a contrastive loss trains on, as :meth:`encode` takes its inputs: ``encode``'s own
        first, then any of the head's parts that learn from a loss of their own (each paired with the same part of
        the other modality's), e.g. the UP's linear path with ``path_loss="own"``. Most heads: ``encode``'s alone."""
        if modality not in self.config.input_dims:
            raise KeyError(f"unknown modality {modality!r}; known: {self.modalities}")
        tokens, mask = prepare_tokens(tokens, mask, self.config.input_dims[modality], modality)
        return self._training_embeddings(modality, tokens, mask)

    def _training_embeddings(self, modality: str, tokens: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        return (self._encode(modality, tokens, mask),)

    def forward(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.encode(modality, tokens, mask)

    def add_modality(self, name: str, in_dim: int, al_kind: str | None = None) -> None:
        """Step 2: add the per-modality layer(s) of a new modality (kind ``al_kind``, default ``al_kinds[0]``)."""
        self._add_modality(name, in_dim, al_kind)

    def _add_modality(self, name: str, in_dim: int, al_kind: str | None, **config_changes: Any) -> None:
        if name in self.config.input_dims:
            raise ValueError(f"modality {name!r} already exists")
        al_kind = self.al_kinds[0] if al_kind is None else al_kind
        if al_kind not in self.al_kinds:
            raise ValueError(f"al_kind must be one of {self.al_kinds}, got {al_kind!r}")
        # Validate the new config (name included) before touching any module, so bad input changes nothing.
        config = replace(
            self.config,
            input_dims={**self.config.input_dims, name: int(in_dim)},
            adapters={**self.config.adapters, name: al_kind},
            **config_changes,
        )
        device = next(self.parameters()).device
        self._build_modality(config, name, device)
        self.config = config

    def freeze_for_alignment(self, new_modality: str) -> list[str]:
        """Freeze everything except ``new_modality``'s own parameters; return the trainable parameter names.

        Idempotent. Dropout in frozen parts still follows ``train()`` / ``eval()``: that is the caller's call.
        """
        if new_modality not in self.config.input_dims:
            raise KeyError(f"unknown modality {new_modality!r}; known: {self.modalities}")
        return freeze_except(self, self._modality_prefixes(new_modality))

    # ---- implemented by each head ------------------------------------------------------------------------------
    def _encode(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def _modality_prefixes(self, modality: str) -> tuple[str, ...]:
        raise NotImplementedError

    def _build_modality(self, config: Any, name: str, device: torch.device) -> None:
        raise NotImplementedError
