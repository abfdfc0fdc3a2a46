"""Train a sentencepiece BPE tokenizer for code and prose.

Installed as `internlm-train-tokenizer`; the code is in `internlm/cli/train_tokenizer.py`,
and `python tools/train_tokenizer.py --help` lists the options."""
import sys

from internlm.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
