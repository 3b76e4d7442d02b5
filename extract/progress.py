"""Progress and log lines of the long steps (extraction, training, embedding): one mechanism for the project.

On a terminal a tqdm bar (count, rate, ETA) is drawn on stderr. Anywhere else (nohup, SLURM, CI logs) the same tqdm
object writes one plain line through :mod:`logging` at a steady interval (``ONEENCODER_PROGRESS_SECONDS``, default
30 s) with the count, rate, ETA and the failures so far, and no carriage returns. Messages go to the loggers of the
project's packages (``extract``, ``pipeline``, ``stores``, ``project``), so a user can route them like any other
log; :func:`configure_logging` is what the command line uses for ``--quiet`` / ``--verbose``. ``extract/`` sits
upstream of ``pipeline/``, so the mechanism lives here and ``pipeline.progress`` re-exports it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["INTERVAL_ENV", "PACKAGES", "configure_logging", "progress_bar", "progress_interval"]

INTERVAL_ENV = "ONEENCODER_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
PACKAGES = ("extract", "pipeline", "stores", "project")
logger = logging.getLogger("extract.progress")
_quiet = False


class _LogLines:
    """What tqdm writes to when stderr is not a terminal: each refresh becomes one INFO record."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            logger.info(line)

    def flush(self) -> None:
        pass


def progress_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "item",
                 enabled: bool = True, leave: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand): drawn on a terminal, logged as a line every
    :func:`progress_interval` seconds elsewhere, silent unless ``enabled`` and with ``--quiet``. A ``failed=N``
    postfix (``set_postfix``) is part of each line. ``leave=False`` erases a terminal bar when done."""
    if not enabled or _quiet:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    counted = "{n_fmt}/{total_fmt} " + unit + "s ({percentage:.0f}%)" if total else "{n_fmt} " + unit + "s"
    eta = ", ETA {remaining}" if total else ""
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=_LogLines(), leave=True,
                mininterval=progress_interval(), miniters=1, ascii=True,
                bar_format="{desc}: " + counted + " in {elapsed}, {rate_fmt}" + eta + "{postfix}")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (click's test runner and pytest swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def configure_logging(verbosity: int = 0) -> None:
    """Log the project's packages to stderr (the command line's set-up): warnings only (``verbosity`` < 0, ``--quiet``: no progress either),
    plain messages (0), or debug records with time and logger name (> 0, ``--verbose``). Other libraries' loggers
    are left as they are. Calling it again replaces the handler it installed."""
    global _quiet
    _quiet = verbosity < 0
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    fmt = "%(asctime)s %(name)s %(levelname)s: %(message)s" if verbosity > 0 else "%(message)s"
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(fmt))
    handler.set_name("oneencoder-cli")
    for name in PACKAGES:
        package = logging.getLogger(name)
        for old in [h for h in package.handlers if h.get_name() == "oneencoder-cli"]:
            package.removeHandler(old)
        package.addHandler(handler)
        package.setLevel(level)
