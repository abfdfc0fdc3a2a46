"""Tokenize text, chat or instruction data into InternEvo's X.bin / X.bin.meta format.

    python tools/tokenizer.py --text_input_path data.jsonl --bin_output_path out/en/data.bin \
        --tokenizer_path tokenizer.model [--format auto|text|chat|instruction] [--workers 4] [--text_key text]

Samples: each line of a .txt, each record of a .jsonl, each item of a .json list. The format is taken
from the first record unless --format names it (doc/finetune.md):
  text         the text under --text_key (or a bare string): bos + tokens + eos, all with loss
               (turn bos/eos off with --no_add_bos / --no_add_eos); blank samples are skipped;
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}: InternLM's
               chat template, loss on the assistant turns (content and <|im_end|>) only;
  instruction  {"instruction", "input", "output"} (alpaca): a user turn and an assistant turn.
Tokens without loss are stored negative (InternEvo's convention). Put outputs in a sub-folder named
after the data type (en/, code/, ...): that folder name is the sample's type when training.
"""

import argparse
import sys
from pathlib import Path

from internlm.data.chat import FORMATS
from internlm.data.text import encode_records, iter_records
from internlm.data.tokenized import DataFormatError, write_bin
from internlm.progress import progress as show_progress


def tokenize_file(
    input_path,
    output_bin,
    tokenizer_path,
    workers: int = 1,
    text_key: str = "text",
    add_bos: bool = True,
    add_eos: bool = True,
    progress: bool = False,
    fmt: str = "auto",
) -> int:
    """Tokenize `input_path` into `output_bin` (+ .meta); returns the number of samples written.

    The output is the same whatever `workers` is: batches are encoded in a process pool and
    collected in input order.
    """
    for what, p in (("input file", input_path), ("tokenizer", tokenizer_path)):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{what} not found: {p}")
    encoded = encode_records(iter_records(input_path, fmt, text_key), tokenizer_path, workers, add_bos, add_eos)
    if progress:
        encoded = show_progress(encoded, desc=Path(input_path).name, unit="samples")
    return write_bin(output_bin, encoded)


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_input_path", required=True, help=".txt, .json or .jsonl")
    parser.add_argument("--bin_output_path", required=True, help="X.bin (X.bin.meta is written next to it)")
    parser.add_argument("--tokenizer_path", required=True, help="sentencepiece .model")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="auto: from the first record (default)")
    parser.add_argument("--text_key", default="text")
    parser.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--add_eos", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    try:
        n = tokenize_file(
            args.text_input_path,
            args.bin_output_path,
            args.tokenizer_path,
            workers=args.workers,
            text_key=args.text_key,
            add_bos=args.add_bos,
            add_eos=args.add_eos,
            progress=True,
            fmt=args.format,
        )
    except (OSError, RuntimeError, DataFormatError, UnicodeDecodeError) as e:
        # OSError covers a missing file; RuntimeError is how sentencepiece reports an unreadable model.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} samples to {args.bin_output_path} and {args.bin_output_path}.meta")
    return 0


if __name__ == "__main__":
    sys.exit(main())
