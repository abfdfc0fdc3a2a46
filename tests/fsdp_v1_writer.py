"""Write an InternEvo fsdp checkpoint folder as InternEvo's save_model_checkpoint does with
parallel.zero1.fsdp=True: every data-parallel rank saves torch.save(model.state_dict()) taken under FSDP
(v1, use_orig_params=True, each block its own FSDP unit) with StateDictType.SHARDED_STATE_DICT, to
model_tp{t}_pp{p}_dp{rank}.pt. The tensors come from an InternEvo mtp folder's model_tp{t}_pp{p}.pt
(same names, same tp/pp split); its other files are copied.

    torchrun --nproc_per_node D tests/fsdp_v1_writer.py SRC_FOLDER OUT_FOLDER
"""
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


class Block(nn.Module):
    """One layer (`layers.{i}` / `blocks.{i}`): InternEvo wraps each in its own FSDP unit."""


def module_of(state: dict) -> nn.Module:
    """A module whose state_dict has exactly `state`'s names (parameters; rotary buffers as buffers)."""
    root = nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        mod = root
        for i, part in enumerate(path):
            if not hasattr(mod, part):
                block = i > 0 and path[i - 1] in ("layers", "blocks") and part.isdigit()
                mod.add_module(part, Block() if block else nn.Module())
            mod = getattr(mod, part)
        if leaf == "inv_freq":
            mod.register_buffer(leaf, tensor.clone())
        else:
            mod.register_parameter(leaf, nn.Parameter(tensor.clone()))
    return root


def main(src: Path, out: Path) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if not re.match(r"^model_tp\d+_pp\d+\.pt$", f.name):
                shutil.copy(f, out / f.name)
    dist.barrier()
    for f in sorted(src.iterdir()):
        m = re.match(r"^model_tp(\d+)_pp(\d+)\.pt$", f.name)
        if not m:
            continue
        model = FSDP(module_of(torch.load(f, weights_only=True)), use_orig_params=True,
                     auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"))
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            states = model.state_dict()
        torch.save(states, out / f"model_tp{m.group(1)}_pp{m.group(2)}_dp{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
