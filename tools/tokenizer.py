"""Tokenize raw text into InternEvo's X.bin / X.bin.meta format.

Installed as `internlm-tokenize`; the code is in `internlm/cli/tokenizer.py`,
and `python tools/tokenizer.py --help` lists the options."""
import sys

from internlm.cli.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
