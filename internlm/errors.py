"""Turn user mistakes and distributed failures into one clear line per rank instead of a traceback."""
from __future__ import annotations

import contextlib
import os
import sys

import torch.distributed as dist


class ConversionError(ValueError):
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


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _wait_for_peers(seconds: float = 10.0):
    """Before a rank exits on a user error: wait (briefly) until the other ranks reach the same point.
    Errors that depend on the layout are found by every rank at once, and the launcher kills the
    remaining ranks as soon as one exits; without this a slower rank could be killed before it
    printed its own line. A rank-local error just waits out the timeout."""
    from datetime import timedelta

    try:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.monitored_barrier(timeout=timedelta(seconds=seconds))
    except Exception:  # noqa: BLE001 - best effort during error exit
        pass


def _finish_together(seconds: float = 300.0) -> None:
    """After a successful run: every rank reaches this point before any tears down its process group.
    A rank that destroyed its gloo group while a peer was still finishing its last collective made
    that peer abort at exit ("terminate called without an active exception", seen once in CI)."""
    from datetime import timedelta

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    if "gloo" in str(dist.get_backend()):  # "gloo" or "cpu:gloo,cuda:nccl": a timed, CPU-side barrier
        dist.monitored_barrier(timeout=timedelta(seconds=seconds))
    else:
        dist.barrier()


def run_guarded(fn) -> int:
    from internlm.config import ConfigError
    from internlm.launch import LaunchError, shutdown

    try:
        fn()
        _finish_together()
        return 0
    except (ConfigError, LaunchError, FileNotFoundError) as exc:
        print(f"[rank {_rank()}] error: {exc}", file=sys.stderr, flush=True)
        _wait_for_peers()
        return 2
    except ValueError as exc:
        # data format problems (DataFormatError is a ValueError) and similar user-facing errors
        if type(exc).__name__ in ("DataFormatError", "CheckpointError"):
            print(f"[rank {_rank()}] error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    except dist.DistBackendError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"[rank {_rank()}] collective failed or timed out during {current_phase(exc)}: {first}",
              file=sys.stderr, flush=True)
        return 3
    except RuntimeError as exc:
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in text.lower() or "connection closed" in text.lower():
            first = text.strip().splitlines()[0]
            print(f"[rank {_rank()}] collective failed or timed out during {current_phase(exc)}: {first}",
                  file=sys.stderr, flush=True)
            return 3
        raise
    finally:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - best effort during error exit
            pass
