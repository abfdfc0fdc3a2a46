"""The finetuning demo (`python tools/demo.py --sft`): teach the pretrained demo model a task with chat
data and loss masks, then measure it on held-out prompts.

1. the instruction set (internlm.data.sft_demo): "which line of this code defines `name`?" over stdlib
   code, test prompts from other modules than the training ones; written as chat .jsonl;
2. finetuning with configs/demo_sft.py from the demo checkpoint (weights only), reading the .jsonl
   directly (data.type='streaming'); loss on the answers only, or on everything with --no_mask;
3. greedy chat generation on the first --eval test prompts, stopped at <|im_end|>: exact-match
   accuracy, printed and written to RUN_FOLDER/sft_eval.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SFT_CONFIG = "demo_sft.py"


def prepare_sft_data(data_dir: Path, tokenizer_path: str, no_mask: bool) -> tuple[Path, Path]:
    """(train folder, test .jsonl): chat .jsonl (masks from the template), or with `no_mask` a .bin
    folder where every token carries loss."""
    from internlm.data.sft_demo import sft_examples

    sft = data_dir / "sft"
    train_jsonl, test_jsonl = sft / "train" / "chat.jsonl", sft / "test.jsonl"
    if not (train_jsonl.is_file() and test_jsonl.is_file()):
        examples = sft_examples()
        for path, records in ((train_jsonl, examples["train"]), (test_jsonl, examples["test"])):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            tmp.replace(path)
        print(f"[demo-sft] {len(examples['train'])} training and {len(examples['test'])} test examples in {sft}",
              flush=True)
    if not no_mask:
        return train_jsonl.parent, test_jsonl
    unmasked = sft / "train_no_mask" / "chat" / "sft.bin"
    if not unmasked.is_file():
        from internlm.data.text import encode_records, iter_records
        from internlm.data.tokenized import write_bin

        ids = encode_records(iter_records(train_jsonl, "chat"), tokenizer_path)
        write_bin(unmasked, ([abs(t) for t in x] for x in ids))  # every token a target
    return unmasked.parent.parent, test_jsonl


def evaluate(ckpt: Path, tokenizer_path: str, test_jsonl: Path, limit: int) -> dict:
    """Greedy answers to the first `limit` test prompts; exact match after stripping whitespace."""
    import sentencepiece as spm

    from internlm.data.chat import ChatEncoder
    from internlm.inference import generate, load_model

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    encoder = ChatEncoder(sp, tokenizer_path)
    model = load_model(ckpt)
    records = [json.loads(line) for line in test_jsonl.read_text(encoding="utf-8").splitlines()[:limit]]
    stop = [encoder.end, sp.eos_id()]
    right, shown = 0, []
    for rec in records:
        prompt, expected = rec["messages"][:-1], rec["messages"][-1]["content"]
        new = generate(model, encoder.encode_prompt(prompt), max_new_tokens=64, greedy=True, eos_token_id=stop)
        got = sp.decode([t for t in new if t not in stop]).strip()
        right += got == expected.strip()
        if len(shown) < 5:
            shown.append({"question": prompt[-1]["content"], "expected": expected, "got": got})
    return {"accuracy": right / max(1, len(records)), "correct": right, "total": len(records), "examples": shown}


def run_sft(args, data: dict, base_ckpt: Path, root: Path) -> int:
    from internlm.checkpoint import verify
    from internlm.cli import train
    from internlm.config import load_config
    from internlm.errors import UserError

    t0 = time.time()
    train_folder, test_jsonl = prepare_sft_data(Path(args.data_dir), data["tokenizer_path"], args.no_mask)
    config = str(root / "configs" / SFT_CONFIG)
    overrides = [f"data.train_folder={str(train_folder)!r}", f"data.tokenizer_path={data['tokenizer_path']!r}",
                 "ckpt.load_ckpt_info=" + repr({"path": str(base_ckpt), "content": ["model"], "ckpt_type": "internlm"})]
    if args.no_mask:
        overrides += ["data.type='tokenized'", "JOB_NAME='demo_sft_no_mask'", "monitor.run_folder=None",
                      "ckpt.save_ckpt_folder='runs/demo_sft_no_mask/ckpt'"]
    overrides += list(args.overrides)
    try:
        cfg = load_config(config, overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[demo-sft] finetuning {base_ckpt} on {train_folder} ({'no masks' if args.no_mask else 'masked'})",
          flush=True)
    rc = train.main(["--config", config, *overrides])
    if rc != 0:
        return rc
    ckpt = verify.find_latest(cfg.ckpt.save_ckpt_folder, deep=False)[0]
    if ckpt is None:
        print(f"[demo-sft] no checkpoint in {cfg.ckpt.save_ckpt_folder}", flush=True)
        return 1
    t1 = time.time()
    result = evaluate(ckpt.path, data["tokenizer_path"], test_jsonl, args.eval)
    result.update(checkpoint=str(ckpt.path), masks=not args.no_mask, steps=ckpt.step,
                  finetune_seconds=round(t1 - t0, 1), eval_seconds=round(time.time() - t1, 1))
    out = Path(cfg.monitor.run_folder) / "sft_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"[demo-sft] exact match on {result['total']} held-out prompts: {result['accuracy']:.1%} "
          f"({result['correct']}/{result['total']}) -> {out}", flush=True)
    for ex in result["examples"][:3]:
        print(f"[demo-sft]   {ex['question'].splitlines()[-1]}  ->  {ex['got']}", flush=True)
    print(f"[demo-sft] chat with it: python tools/generate.py --ckpt {ckpt.path} --chat --greedy", flush=True)
    return 0
