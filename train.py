"""Train an InternLM-family model from a config file.

Installed as `internlm-train`; the code is in `internlm/cli/train.py`,
and `python train.py --help` lists the options."""
import sys

from internlm.cli.train import entry

if __name__ == "__main__":
    sys.exit(entry())
