"""`train.py --track-memory`: the tensor memory one rank holds at its peak during one training step, by
kind, as PyTorch's MemTracker sees it (torch.distributed._tools.mem_tracker).

MemTracker follows every tensor storage the step creates or frees (FSDP's resized all-gather buffers
included) and attributes it to a kind: parameters, buffers, gradients, activations, temporaries (a
kernel's scratch, a collective's buffer), optimizer states. The model parts and the optimizer's states
that exist before the step are registered first. The second step of the run is tracked (the first
creates the optimizer states), and each rank writes `<run folder>/memory/rank<R>.json`:
{"step", "peak_bytes": {kind: bytes at the moment of the peak, "total": their sum}}. Unlike the resident
set in metrics.jsonl this leaves out the Python runtime, libraries and allocator caches: it is what the
planner (tools/plan.py) predicts, and tests/parallel/test_plan_memory.py holds the two together.
Tracking sends every operator of that step through Python: a slower step, the same numbers.
"""
from __future__ import annotations

import json
from pathlib import Path


def _StepTracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        """MemTracker for a step of several micro-batches: a root module's next forward (the next
        micro-batch, a pipeline stage's next one) starts its module statistics afresh instead of being
        refused; the device-wide peak, which is what is read here, keeps counting."""

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents <= {"Global"}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

    return StepTracker()


class StepMemoryTracker:
    def __init__(self, run_folder, rank: int, model_parts, optimizers, first_step: int = 0, later: int = 0):
        """`later`: steps to wait beyond the second (with --count-comm, whose counter, another dispatch mode,
        takes the second step)."""
        self.path = Path(run_folder) / "memory" / f"rank{rank}.json"
        self.parts, self.optimizers = list(model_parts), list(optimizers)
        self.target = first_step + 2 + later
        self.tracker = None

    def after_step(self, step: int, metrics: dict | None = None) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            snap = self.tracker.get_tracker_snapshot("peak")
            peak = {}
            for _device, kinds in snap.items():
                for kind, nbytes in kinds.items():
                    name = str(kind).split(".")[-1].lower()
                    peak[name] = peak.get(name, 0) + int(nbytes)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"step": step, "peak_bytes": peak}, indent=1, sort_keys=True))
            self.tracker = None
        elif step + 1 == self.target:
            self.tracker = _StepTracker()
            self.tracker.track_external(*self.parts, *self.optimizers)
            self.tracker.__enter__()

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            self.tracker = None
