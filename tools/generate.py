"""Continue a prompt with a trained model (a training checkpoint or a Hugging Face folder).

Installed as `internlm-generate`; the code is in `internlm/cli/generate.py`,
and `python tools/generate.py --help` lists the options."""
import sys

from internlm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
