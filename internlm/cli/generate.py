"""Continue a prompt with a trained model (a training checkpoint or a Hugging Face folder).

    python tools/generate.py --ckpt DIR --prompt "def fib(n):" [--tokenizer tokenizer.model] \
        [--max_new_tokens 64] [--greedy | --top_p 0.9 --temperature 0.8] [--seed 0]

The tokenizer defaults to DIR/tokenizer.model (a HF export) or the checkpoint config's
data.tokenizer_path. Prints the continuation only. No KV cache: each token re-runs the sequence.
"""

import argparse
import sys
from pathlib import Path


def find_tokenizer(ckpt: str, given: str | None) -> str | None:
    if given:
        return given
    from internlm.checkpoint.reader import read_ckpt_config, resolve_ckpt_dir
    from internlm.errors import UserError
    from internlm.hf.tokenizer_files import find_tokenizer as tokenizer_of_config
    from internlm.hf.weights import is_hf_dir

    path = Path(ckpt)
    if (path / "tokenizer.model").is_file():
        return str(path / "tokenizer.model")
    if not is_hf_dir(path):
        try:
            step_dir = resolve_ckpt_dir(path)
            return tokenizer_of_config(read_ckpt_config(step_dir), step_dir)
        except UserError:  # no readable config: no tokenizer to find
            return None
    return None


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (or root) or Hugging Face folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    import sentencepiece as spm
    import torch

    from internlm.config import torch_dtype
    from internlm.errors import UserError
    from internlm.inference import generate, load_model

    tok_path = find_tokenizer(args.ckpt, args.tokenizer)
    if not tok_path or not Path(tok_path).is_file():
        print("error: no tokenizer found; pass --tokenizer PATH/tokenizer.model", file=sys.stderr)
        return 2
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    try:
        model = load_model(args.ckpt, device=args.device, dtype=torch_dtype(args.dtype))
    except UserError as exc:  # config, checkpoint, conversion: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(args.prompt)
    if max(ids, default=0) >= model.args.vocab_size:
        print(f"error: the tokenizer's ids exceed the model's vocab_size {model.args.vocab_size}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    new = generate(model, ids, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, eos_token_id=sp.eos_id() if sp.eos_id() >= 0 else None,
                   generator=gen)
    if new and new[-1] == sp.eos_id():
        new = new[:-1]
    print(sp.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
