"""User errors and collective failures become one clear line per rank instead of a traceback.

Every error a user can cause and fix (a config key, a data file, a checkpoint, a conversion, the
launch environment) derives from `UserError`; `run_guarded` prints it as `[rank N] error: ...` and
exits 2. A failed or timed-out collective names the phase the rank was in and exits 3.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta

from internlm.log import logger


class UserError(Exception):
    """A mistake the user can fix, worded as a complete sentence (no traceback needed)."""


class ConversionError(UserError, ValueError):
    """A conversion that cannot be done, worded for the user (the tools exit with status 2).

    Raised by the Hugging Face conversion (internlm.hf) and by the checkpoint reader
    (internlm.checkpoint.reader); it lives here so that neither package imports the other for it."""


_PHASE = ["start-up"]


@contextlib.contextmanager
def phase(name: str):
    """Label what this rank is doing, so a failed or timed-out collective can say where it was."""
    _PHASE.append(name)
    try:
        yield
    except BaseException as exc:
        if not hasattr(exc, "internlm_phase"):
            try:
                exc.internlm_phase = name  # the innermost phase wins
            except AttributeError:
                pass
        raise
    finally:
        _PHASE.pop()


def current_phase(exc: BaseException | None = None) -> str:
    return getattr(exc, "internlm_phase", None) or _PHASE[-1]


def _wait_for_peers(seconds: float = 10.0):
    """Before a rank exits on a user error: wait (briefly) until the other ranks reach the same point.
    Errors that depend on the layout are found by every rank at once, and the launcher kills the
    remaining ranks as soon as one exits; without this a slower rank could be killed before it
    printed its own line. A rank-local error just waits out the timeout."""
    import torch.distributed as dist

    try:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.monitored_barrier(timeout=timedelta(seconds=seconds))
    except Exception:  # noqa: BLE001 - best effort during error exit
        pass


def _finish_together(seconds: float = 300.0) -> None:
    """After a successful run: every rank reaches this point before any tears down its process group.
    A rank that destroyed its gloo group while a peer was still finishing its last collective made
    that peer abort at exit ("terminate called without an active exception", seen once in CI)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    if "gloo" in str(dist.get_backend()):  # "gloo" or "cpu:gloo,cuda:nccl": a timed, CPU-side barrier
        dist.monitored_barrier(timeout=timedelta(seconds=seconds))
    else:
        dist.barrier()


def _is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistBackendError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in ("timed out", "timeout", "connection closed",
                                                                     "connection reset", "broken pipe"))


def _collective_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else repr(exc)
    lowered = text.lower()
    if any(w in lowered for w in ("connection reset", "connection closed", "broken pipe")):
        return f"another rank left (connection lost) during {current_phase(exc)}: {first}"
    return f"collective failed or timed out during {current_phase(exc)}: {first}"


def run_guarded(fn) -> int:
    """Run `fn()`; user errors and collective failures become one line per rank and an exit code."""
    from internlm.launch import shutdown
    from internlm.log import setup_logging

    setup_logging()
    try:
        fn()
        _finish_together()
        return 0
    except (UserError, FileNotFoundError) as exc:
        logger.error(f"error: {exc}")
        _wait_for_peers()
        return 2
    except RuntimeError as exc:
        if not _is_collective_failure(exc):
            raise
        logger.error(_collective_line(exc))
        return 3
    except KeyboardInterrupt:
        logger.error("interrupted (Ctrl-C twice: stopped without saving)")
        return 130
    finally:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - best effort during error exit
            pass
