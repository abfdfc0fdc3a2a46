"""The planner behind tools/plan.py: will a layout fit, how fast will it run, which layout is best."""
from internlm.plan.estimate import Plan, plan
from internlm.plan.hardware import GPUS, Hardware, resolve_hardware
from internlm.plan.shapes import stage_shapes

__all__ = ["GPUS", "Hardware", "Plan", "plan", "resolve_hardware", "stage_shapes"]
