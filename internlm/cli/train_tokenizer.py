"""Train a sentencepiece BPE tokenizer for code and prose.

    python tools/train_tokenizer.py --input a.jsonl b.txt --model_prefix out/tokenizer [--vocab_size 8000]

Inputs are read like tools/tokenizer.py reads them: a .txt line, a .jsonl record or a .json list item
is one training sentence. The trainer settings (identity normalization, whitespace kept, no dummy
prefix, byte fallback, Llama's unk=0/bos=1/eos=2 and no pad) are in internlm.data.demo.SPM_TRAINER_OPTIONS.
Writes PREFIX.model and PREFIX.vocab; a folder holding PREFIX.model renamed to tokenizer.model loads in
transformers with AutoTokenizer and gives the same ids.
"""

import argparse
import sys
from pathlib import Path

from internlm.data.text import train_sentencepiece
from internlm.data.tokenized import DataFormatError


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".txt, .json or .jsonl files")
    parser.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument(
        "--input_sentence_size", type=int, default=0,
        help="train on a seeded random subset of this many samples (0: all)",
    )
    parser.add_argument(
        "--max_sentence_length", type=int, default=16384, help="samples longer than this (bytes) are not trained on"
    )
    parser.add_argument("--text_key", default="text", help="key of the text in .json/.jsonl objects")
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args(argv)

    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        print(f"error: input file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        model = train_sentencepiece(
            args.input,
            args.model_prefix,
            vocab_size=args.vocab_size,
            input_sentence_size=args.input_sentence_size,
            max_sentence_length=args.max_sentence_length,
            text_key=args.text_key,
            num_threads=args.num_threads,
        )
    except (DataFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
