"""Plan a training run before using a GPU: memory per rank, FLOPs, communication, step time and TGS
for a layout, or the best layouts (--search).

Installed as `internlm-plan`; the code is in `internlm/cli/plan.py`,
and `python tools/plan.py --help` lists the options."""
import sys

from internlm.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
