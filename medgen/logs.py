"""The ``medgen`` logger: printed to stdout at the verbosity the command line chose (``-q``: warnings
only, default: progress, ``-v``: also Flower's and Ray's own messages), and appended with
timestamps to ``<run>/run.log`` once a run directory is open (``to_run_log``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger("medgen")
_CONSOLE = "medgen-console"
_RUN_LOG = "medgen-run-log"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (pytest, ``redirect_stdout``)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure(verbosity: int = 0) -> None:
    """Console output for ``verbosity`` -1 (quiet), 0 or 1 (verbose); idempotent."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = next((h for h in LOGGER.handlers if h.get_name() == _CONSOLE), None)
    if handler is None:
        handler = _Stdout()
        handler.set_name(_CONSOLE)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    handler.setLevel(level)
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.propagate = False
    # Flower's logger prints on its own; below -v only its errors (our messages say what failed)
    logging.getLogger("flwr").setLevel(logging.INFO if verbosity > 0 else logging.ERROR)


def verbosity() -> int:
    """-1, 0 or 1, as ``configure`` last set it (0 when it was never called)."""
    handler = next((h for h in LOGGER.handlers if h.get_name() == _CONSOLE), None)
    if handler is None:
        return 0
    return -1 if handler.level >= logging.WARNING else 1 if handler.level <= logging.DEBUG else 0


def info(line: str) -> None:
    """The default ``log`` callable of the server and the simulation: one progress line."""
    if not LOGGER.handlers:
        configure()
    LOGGER.info(line)


def to_run_log(run_dir: str | Path) -> None:
    """From now on also append medgen's messages (every level) and what Flower's logger lets through
    (its errors, unless -v) to ``<run_dir>/run.log``; a resumed run appends to the same file. One
    run log at a time: this replaces the previous one of this process."""
    if not LOGGER.handlers:
        configure()
    for logger in (LOGGER, logging.getLogger("flwr")):
        for old in [h for h in logger.handlers if h.get_name() == _RUN_LOG]:
            logger.removeHandler(old)
            old.close()
        handler = logging.FileHandler(Path(run_dir) / "run.log", mode="a", encoding="utf-8")
        handler.set_name(_RUN_LOG)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        logger.addHandler(handler)
