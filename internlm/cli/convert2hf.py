"""Export a training checkpoint to a Hugging Face transformers folder.

    python tools/convert2hf.py --src CKPT_DIR --tgt OUT_DIR [--tokenizer tokenizer.model] \
        [--dtype bfloat16] [--max_shard 10GB] [--model_type internlm3|llama|mixtral]

CKPT_DIR is a checkpoint step folder (DCP files + config.yaml) or a checkpoint root (its newest step
is taken), or an InternEvo checkpoint folder (model_tp*_pp*.pt or isp model_tp*_wp*_pp*.pt files), whose
model shape comes from the InternEvo training config given with --config FILE [KEY=VALUE ...].
OUT_DIR receives model-0000x-of-0000N.safetensors, model.safetensors.index.json,
config.json, generation_config.json and, with a tokenizer, tokenizer.model, tokenizer.json,
tokenizer_config.json and special_tokens_map.json; `AutoModelForCausalLM.from_pretrained(OUT_DIR)`
loads it without remote code. --model_type defaults to internlm3 for INTERNLM3, mixtral for
INTERNLM_MoE (doc/moe.md) and llama otherwise.
Exits with status 2 when the target cannot express the model. See doc/convert.md.
"""

import argparse
import sys


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="checkpoint step folder or checkpoint root")
    parser.add_argument("--tgt", required=True, help="output folder")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece tokenizer.model (default: the config's data.tokenizer_path if it exists)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    parser.add_argument("--max_shard", default="10GB", help="largest safetensors file, e.g. 10GB or 500MB")
    parser.add_argument("--model_type", default=None, choices=["internlm3", "llama", "mixtral"],
                        help="transformers model type (default: internlm3 for INTERNLM3, mixtral for MoE, llama "
                             "otherwise)")
    parser.add_argument("--config", default=None,
                        help="with an InternEvo checkpoint folder: the training config it was written with")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of --config")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from internlm.config import torch_dtype
    from internlm.errors import UserError
    from internlm.hf.export import export_ckpt_to_hf

    try:
        dtype = torch_dtype(args.dtype)
        if _is_internevo(args.src):
            report = _export_internevo(args, dtype)
        else:
            report = export_ckpt_to_hf(args.src, args.tgt, target=args.model_type, dtype=dtype,
                                       max_shard=args.max_shard, tokenizer=args.tokenizer,
                                       progress=not args.no_progress)
    except UserError as exc:  # config, checkpoint, conversion: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.out_dir}: {report.model_type} as transformers '{report.target}', {report.dtype}, "
          f"{report.total_size / 1e6:.1f} MB in {report.shards} shard(s), {report.seconds:.1f}s")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _is_internevo(src) -> bool:
    from internlm.checkpoint.internevo_format import is_internevo_dir

    return is_internevo_dir(src)


def _export_internevo(args, dtype):
    """An InternEvo folder: its tensors merged by InternEvoSource, the model shape from its config."""
    from pathlib import Path

    from internlm.builders import model_args
    from internlm.checkpoint.internevo_format import InternEvoSource
    from internlm.config import ConfigError, load_config
    from internlm.hf.export import export_source_to_hf

    if not args.config:
        raise ConfigError(f"{args.src} is an InternEvo checkpoint folder, which does not record the model's shape: "
                          f"pass the InternEvo config it was trained with (--config FILE, size overrides after it).")
    cfg = load_config(args.config, args.overrides)
    margs = model_args(cfg)
    tokenizer = args.tokenizer
    if tokenizer is None and cfg.data.tokenizer_path and Path(cfg.data.tokenizer_path).is_file():
        tokenizer = cfg.data.tokenizer_path
    report = export_source_to_hf(InternEvoSource(args.src, margs), margs, args.tgt, args.model_type, dtype,
                                 args.max_shard, tokenizer, not args.no_progress)
    report.notes.append(f"InternEvo checkpoint folder {args.src}, model from {args.config}")
    return report


if __name__ == "__main__":
    sys.exit(main())
