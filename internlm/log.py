"""One rank-aware logger for the library: rank 0 speaks, every rank reports warnings and errors.

    from internlm.log import logger
    logger.info("saved ...")        # [internlm] saved ...            (stdout, rank 0 only)
    logger.warning("...")           # [internlm] WARNING: ...         (stdout, every rank)
    logger.error("error: ...")      # [rank 3] error: ...             (stderr, every rank)
    logger.info(line, extra=BARE)   # the line as it is
    logger.info(line, extra=LOG_LINE)  # as it is, from any rank (the per-step log line)

The command-line tools call `setup_logging()`; the Trainer calls it too, so that a run started from
Python prints its progress. INTERNLM_LOG_ALL_RANKS=1 lets every rank print its info lines.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("internlm")
BARE = {"bare": True}
# the per-step log line: printed as it is, by whichever rank holds the loss (the caller decides)
LOG_LINE = {"bare": True, "any_rank": True}


def rank() -> int:
    """This process's rank from the launcher's environment (no process group needed)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or rank() == 0 or getattr(record, "any_rank", False)
                or os.environ.get("INTERNLM_LOG_ALL_RANKS") == "1")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if getattr(record, "bare", False):
            return msg
        if record.levelno >= logging.ERROR:
            return f"[rank {rank()}] {msg}"
        if record.levelno >= logging.WARNING:
            return f"[internlm] WARNING: {msg}"
        return f"[internlm] {msg}"


class _StreamHandler(logging.StreamHandler):
    """Writes to the sys.stdout / sys.stderr of the moment (test capture replaces them)."""

    def __init__(self, errors: bool):
        super().__init__()
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if self.errors else sys.stdout
        super().emit(record)
        self.flush()


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Install the handlers once (idempotent): info and warnings to stdout, errors to stderr."""
    if not any(isinstance(h, _StreamHandler) for h in logger.handlers):
        out, err = _StreamHandler(errors=False), _StreamHandler(errors=True)
        out.addFilter(lambda r: r.levelno < logging.ERROR)
        err.setLevel(logging.ERROR)
        for h in (out, err):
            h.setFormatter(_Format())
            h.addFilter(_RankFilter())
            logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(level)
    return logger
