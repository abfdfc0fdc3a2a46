"""Import a Hugging Face model folder as a training checkpoint of this framework.

Installed as `internlm-convert-hf2internlm`; the code is in `internlm/cli/convert_hf2internlm.py`,
and `python tools/convert_hf2internlm.py --help` lists the options."""
import sys

from internlm.cli.convert_hf2internlm import main

if __name__ == "__main__":
    sys.exit(main())
