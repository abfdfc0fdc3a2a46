"""Continue a prompt, or chat, with a trained model (a training checkpoint or a Hugging Face folder).

    python tools/generate.py --ckpt DIR --prompt "def fib(n):" [--tokenizer tokenizer.model] \
        [--max_new_tokens 64] [--greedy | --top_p 0.9 --temperature 0.8] [--repetition_penalty 1.1] [--seed 0]
    python tools/generate.py --ckpt DIR --chat [--prompt "a question"] [--system "..."]

The tokenizer defaults to DIR/tokenizer.model (a checkpoint's copy or a HF export) or the checkpoint
config's data.tokenizer_path. Prints the continuation only. With --chat the prompt is a user turn in
InternLM's chat template and the answer stops at <|im_end|>; without --prompt each line of standard
input is a user turn of one conversation (an interactive chat on a terminal). No KV cache: each token
re-runs the sequence.
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
    parser.add_argument("--prompt", default=None, help="the text to continue (with --chat: one user turn)")
    parser.add_argument("--chat", action="store_true", help="chat template; several turns from stdin without --prompt")
    parser.add_argument("--system", default=None, help="with --chat: a system message first")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="> 1 discourages repeating tokens (transformers' semantics; 1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    if args.prompt is None and not args.chat:
        parser.error("--prompt is required (or --chat to read turns from standard input)")

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
    gen = torch.Generator().manual_seed(args.seed)

    def complete(ids: list[int], stop: list[int]) -> list[int] | None:
        if max(ids, default=0) >= model.args.vocab_size:
            print(f"error: the tokenizer's ids exceed the model's vocab_size {model.args.vocab_size}", file=sys.stderr)
            return None
        new = generate(model, ids, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, eos_token_id=stop, generator=gen,
                       repetition_penalty=args.repetition_penalty, vocab_limit=sp.get_piece_size())
        return new[:-1] if new and new[-1] in stop else new

    eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
    if not args.chat:
        new = complete(([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(args.prompt), eos)
        if new is None:
            return 2
        print(sp.decode(new))
        return 0
    return _chat(args, sp, tok_path, complete, eos)


def _chat(args, sp, tok_path, complete, eos) -> int:
    from internlm.data.chat import ChatEncoder
    from internlm.errors import UserError

    try:
        encoder = ChatEncoder(sp, tok_path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    history = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else None
    interactive = turns is None and sys.stdin.isatty()
    while True:
        if turns is not None:
            if not turns:
                return 0
            text = turns.pop(0)
        else:
            if interactive:
                print("user> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            text = line.rstrip("\n")
            if not text.strip():
                continue
        history.append({"role": "user", "content": text})
        new = complete(encoder.encode_prompt(history), [encoder.end, *eos])
        if new is None:
            return 2
        answer = sp.decode(new)
        history.append({"role": "assistant", "content": answer})
        print(("assistant> " if interactive else "") + answer, flush=True)


if __name__ == "__main__":
    sys.exit(main())
