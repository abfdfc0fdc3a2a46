"""Process start-up: read the launcher's environment, pick the device and backend, create the
process group, seed the RNGs. Works from `python train.py`, `torchrun` and `srun`."""
from __future__ import annotations

import logging
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from internlm.errors import UserError

logger = logging.getLogger("internlm")


class LaunchError(UserError, RuntimeError):
    pass


@dataclass
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'node[003-005,9],gpu1' (scontrol when present)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def read_env(launcher: str, port: int | None = None) -> tuple[int, int, int]:
    """Set MASTER_ADDR/MASTER_PORT and return (rank, world_size, local_rank)."""
    if launcher == "slurm":
        try:
            rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
            local_rank = int(os.environ.get("SLURM_LOCALID", 0))
            nodelist = os.environ["SLURM_JOB_NODELIST" if "SLURM_JOB_NODELIST" in os.environ else "SLURM_NODELIST"]
        except KeyError as exc:
            raise LaunchError(f"--launcher slurm but {exc.args[0]} is not set: start with srun") from None
        os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
        os.environ["MASTER_PORT"] = str(port or 29500)
        return rank, world, local_rank
    if launcher != "torch":
        raise LaunchError(f"unknown --launcher {launcher!r}; use 'torch' or 'slurm'")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if port:
            os.environ["MASTER_PORT"] = str(port)
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    # a plain `python train.py`: a world of one
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port or _free_port()))
    return 0, 1, 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("device='cuda' was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def elastic_store(rank: int, world: int, timeout: timedelta):
    """Under torchrun, a store whose keys are private to this restart attempt (None elsewhere: env://).

    After a worker dies, torchrun restarts the whole group against the same store server. With plain
    env:// the new processes find the keys of the dead generation (peer addresses, counters) and
    either connect to a port nobody listens on or wait forever in init_process_group; seen in half of
    the restarts tested here. A prefix per `TORCHELASTIC_RESTART_COUNT` gives every attempt fresh keys."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or world == 1:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not agent_hosts_store), timeout=timeout)
    return dist.PrefixStore(f"internlm/attempt_{attempt}", store)


def launch(launcher: str = "torch", port: int | None = None, device: str = "auto",
           timeout_s: int = 1800) -> LaunchInfo:
    rank, world, local_rank = read_env(launcher, port)
    dev = pick_device(device, local_rank)
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                store=elastic_store(rank, world, timeout),
                                device_id=dev if dev.type == "cuda" else None)
    return LaunchInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
