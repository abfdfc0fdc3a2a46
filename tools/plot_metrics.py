"""The curves of a run as one PNG, from its metrics.jsonl: for machines without TensorBoard.

Installed as `internlm-plot-metrics`; the code is in `internlm/cli/plot_metrics.py`,
and `python tools/plot_metrics.py --help` lists the options."""
import sys

from internlm.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
