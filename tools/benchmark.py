"""Training throughput of the real trainer: TGS, TFLOPS, MFU, step time, peak memory; optionally

Installed as `internlm-benchmark`; the code is in `internlm/cli/benchmark.py`,
and `python tools/benchmark.py --help` lists the options."""
import sys

from internlm.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
