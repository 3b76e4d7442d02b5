"""Errors raised by the feature stores, and the base class of every room's user-facing errors. Each message names the
item (a store, a file, an option) and the reason."""

from __future__ import annotations

from pathlib import Path


class OneEncoderError(Exception):
    """A problem the user can fix (bad input, a mismatched store, a missing encoder, ...), as one line naming the
    item and the reason. Every room's own errors derive from it, so the command line catches this one type and
    prints its message instead of a traceback. It lives in ``stores``, the lowest room that the other rooms with
    errors of their own (``extract``, ``pipeline``) already import; ``stores.errors`` imports nothing heavy."""


class StoreError(OneEncoderError):
    """A feature store cannot be created, opened or read as asked."""


class StoreExistsError(StoreError):
    """Something already lives where a new store was to be created."""


class StoreMismatchError(StoreError):
    """A store exists at the path but was made from another encoder, manifest or setting."""

    def __init__(self, path: Path | str, differences: list[str]):
        self.path = Path(path)
        self.differences = differences
        shown = "; ".join(differences[:8]) + (" ..." if len(differences) > 8 else "")
        super().__init__(
            f"store {self.path} was built differently ({shown}). Refusing to mix or overwrite it: "
            "pass --overwrite to replace it, or put '{key}' in the store path to keep one store per configuration."
        )


class StoreIncompleteError(StoreError):
    """The store's extraction did not finish; its contents must not be trained or evaluated on."""
