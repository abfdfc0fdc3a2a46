"""Write an InternEvo fsdp checkpoint folder as InternEvo's save_model_checkpoint does with
parallel.zero1.fsdp=True: every data-parallel rank saves torch.save(model.state_dict()) taken under FSDP
(v1, use_orig_params=True, each block its own FSDP unit) with StateDictType.SHARDED_STATE_DICT, to
model_tp{t}_pp{p}_dp{rank}.pt. The tensors come from an InternEvo mtp folder's model_tp{t}_pp{p}.pt
(same names, same tp/pp split); its other files are copied.

With EXP_AVG_FOLDER EXP_AVG_SQ_FOLDER STEP (mtp folders of AdamW's moments, as the weights), each rank
also writes what InternEvo's FSDPadaptOptimizer.state_dict() holds, to optimizer_tp{t}_pp{p}_zo{rank}.pt:
per parameter group a list of the rank's 1-D pieces of its parameters (FSDP's sharded views,
use_orig_params, some empty) as `flat_fp32_weights`, and torch AdamW's state of those pieces. Groups:
0 "default" the matrices, 1 "fp32" the vectors, in model.parameters() order.

    torchrun --nproc_per_node D tests/fsdp_v1_writer.py SRC_FOLDER OUT_FOLDER [EXP_AVG EXP_AVG_SQ STEP]
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


def fsdp_of(state: dict) -> FSDP:
    return FSDP(module_of(state), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({Block}),
                device_id=torch.device("cpu"))


def optimizer_state(weights: FSDP, full: dict, moments: dict[str, FSDP], step: float) -> dict:
    names = [n.replace("_fsdp_wrapped_module.", "") for n, _ in weights.named_parameters()]
    pieces = [p.detach().float().clone() for p in weights.parameters()]
    moment_pieces = {k: [p.detach().float().clone() for p in m.parameters()] for k, m in moments.items()}
    groups = [[i for i, n in enumerate(names) if full[n].dim() >= 2]]
    groups.append([i for i in range(len(pieces)) if i not in groups[0]])
    state, param_groups, flats = {}, [], {}
    for g, members in enumerate(groups):
        param_groups.append({"params": members, "lr": 1e-3, "name": ("default", "fp32")[g], "weight_decay": 0.01})
        flats[g] = [pieces[i] for i in members]
        for i in members:
            state[i] = {"step": torch.tensor(step), **{k: v[i] for k, v in moment_pieces.items()}}
    return {"grad_scaler": {"_scale": torch.tensor(1.0), "_growth_step": 0, "_hysteresis_step": 0},
            "base_optim_states": {"state": state, "param_groups": param_groups}, "flat_fp32_weights": flats}


def main(src: Path, out: Path, moments: dict[str, Path], step: float) -> None:
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
        full = torch.load(f, weights_only=True)
        model = fsdp_of(full)
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            states = model.state_dict()
        torch.save(states, out / f"model_tp{m.group(1)}_pp{m.group(2)}_dp{rank}.pt")
        if moments:
            wrapped = {k: fsdp_of(torch.load(folder / f.name, weights_only=True)) for k, folder in moments.items()}
            torch.save(optimizer_state(model, full, wrapped, step),
                       out / f"optimizer_tp{m.group(1)}_pp{m.group(2)}_zo{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    extra = sys.argv[3:]
    main(Path(sys.argv[1]), Path(sys.argv[2]),
         {"exp_avg": Path(extra[0]), "exp_avg_sq": Path(extra[1])} if extra else {}, float(extra[2]) if extra else 0.0)
