"""Progress bars for the long steps (fit steps, embedding): the project's one mechanism, from :mod:`extract.progress`
(a tqdm bar on a terminal, a log line at a steady interval elsewhere). ``extract/`` sits upstream of ``pipeline/``,
so it lives there."""

from __future__ import annotations

from extract.progress import configure_logging, progress_bar

__all__ = ["configure_logging", "progress_bar"]
