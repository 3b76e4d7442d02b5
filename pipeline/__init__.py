"""Orchestration: pairing, the fit loop, evaluation, embedding and search.

For notebooks: ``from pipeline import Run, StoreDataset`` (see :mod:`pipeline.api`). They are imported on first
use, so ``import pipeline.x`` stays as cheap as the module x.
"""

__all__ = ["Run", "StoreDataset"]


def __getattr__(name: str):
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
