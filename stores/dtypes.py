"""The dtypes a store can hold, in one table: the name on the command line, the name a store and its identity
record (torch's and numpy's name too), and what zarr writes. Every other module reads these names from here.

torch is imported only by :func:`as_torch_dtype`, so reading a store's metadata stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "STORAGE_DTYPE", "StoredDtype", "as_torch_dtype"]


@dataclass(frozen=True)
class StoredDtype:
    short: str  # on the command line: --dtype fp16
    name: str  # recorded in the store and its identity; torch and numpy call it the same
    storage: str  # what zarr writes: zarr v3 has no bfloat16, so its bits are stored as uint16


_TABLE = (
    StoredDtype("fp16", "float16", "float16"),
    StoredDtype("fp32", "float32", "float32"),
    StoredDtype("bf16", "bfloat16", "uint16"),
)

DTYPES = {d.short: d.name for d in _TABLE}  # command-line name -> stored name
STORAGE_DTYPE = {d.name: d.storage for d in _TABLE}  # stored name -> zarr's array dtype


def as_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    import torch

    if name not in STORAGE_DTYPE:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPE)}, not {name!r}")
    return getattr(torch, name)
