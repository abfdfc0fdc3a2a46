"""Import a Hugging Face model folder as a training checkpoint of this framework.

    python tools/convert_hf2internlm.py --src HF_DIR --tgt CKPT_DIR [--config OUT_CONFIG.yaml] [--dtype float32]

HF_DIR: a transformers llama or internlm3 folder (safetensors, sharded or not, or pytorch_model*.bin),
InternLM v1 (model_type internlm) or InternLM2's published layout (fused attention.wqkv). CKPT_DIR
receives a torch.distributed.checkpoint with keys `model.<name>`, config.yaml (the model section
derived from config.json) and meta.json. --config also writes a training config that starts from it
(ckpt.load_ckpt_info=dict(path=CKPT_DIR, content=("model",), ckpt_type="internlm")).
Training can also start from HF_DIR directly with ckpt_type="hf". See doc/convert.md.
"""

import argparse
import sys


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="Hugging Face model folder")
    parser.add_argument("--tgt", required=True, help="checkpoint folder to write")
    parser.add_argument("--config", default=None, help="also write a training config (.yaml) loading this checkpoint")
    parser.add_argument("--dtype", default="float32", help="dtype of the stored weights (float32: master weights)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from internlm.config import torch_dtype
    from internlm.errors import UserError
    from internlm.hf.importer import import_hf_to_ckpt

    try:
        info = import_hf_to_ckpt(args.src, args.tgt, config_out=args.config, dtype=torch_dtype(args.dtype),
                                 progress=not args.no_progress)
    except UserError as exc:  # config, checkpoint, conversion: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {info['ckpt_dir']}: {info['model_type']}, {info['num_params'] / 1e6:.2f}M parameters, "
          f"{info['tensors']} tensors" + (f"; training config {args.config}" if args.config else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
