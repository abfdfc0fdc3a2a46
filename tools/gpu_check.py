"""GPU proof in one run: correctness of the CUDA paths against the CPU, and throughput against Hugging Face.

Installed as `internlm-gpu-check`; the code is in `internlm/cli/gpu_check.py`,
and `python tools/gpu_check.py --help` lists the options."""
import sys

from internlm.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
