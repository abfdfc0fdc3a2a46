"""Export a training checkpoint to a Hugging Face transformers folder.

Installed as `internlm-convert2hf`; the code is in `internlm/cli/convert2hf.py`,
and `python tools/convert2hf.py --help` lists the options."""
import sys

from internlm.cli.convert2hf import main

if __name__ == "__main__":
    sys.exit(main())
