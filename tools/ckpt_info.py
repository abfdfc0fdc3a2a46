"""Describe a training checkpoint without a process group (reads meta.json, state.json, config.yaml).

Installed as `internlm-ckpt-info`; the code is in `internlm/cli/ckpt_info.py`,
and `python tools/ckpt_info.py --help` lists the options."""
import sys

from internlm.cli.ckpt_info import main

if __name__ == "__main__":
    sys.exit(main())
