"""The end-to-end demo: build an offline corpus, train a tokenizer, tokenize, train a small model.

Installed as `internlm-demo`; the code is in `internlm/cli/demo.py`,
and `python tools/demo.py --help` lists the options."""
import sys

from internlm.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
