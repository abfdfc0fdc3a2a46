"""Turn user mistakes and distributed failures into one clear line per rank instead of a traceback."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def run_guarded(fn) -> int:
    from internlm.config import ConfigError
    from internlm.launch import LaunchError, shutdown

    try:
        fn()
        return 0
    except (ConfigError, LaunchError, FileNotFoundError) as exc:
        print(f"[rank {_rank()}] error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ValueError as exc:
        # data format problems (DataFormatError is a ValueError) and similar user-facing errors
        if type(exc).__name__ in ("DataFormatError", "CheckpointError"):
            print(f"[rank {_rank()}] error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    except dist.DistBackendError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"[rank {_rank()}] collective failed or timed out: {first}", file=sys.stderr, flush=True)
        return 3
    except RuntimeError as exc:
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in text.lower() or "connection closed" in text.lower():
            first = text.strip().splitlines()[0]
            print(f"[rank {_rank()}] collective failed or timed out: {first}", file=sys.stderr, flush=True)
            return 3
        raise
    finally:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - best effort during error exit
            pass
