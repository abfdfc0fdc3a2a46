"""A MoE model through the real commands: `train.py` on the shipped 1.8B_MoE16_sft.py with only size
overrides (two processes), its checkpoint resumed under one process, and `tools/convert2hf.py`
exporting it as Mixtral with the checkpoint's own logits."""
import math

import torch

from tests import launcher
from tests.helpers import ROOT, run_python

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=128",
         "model.num_experts=4", "model.dtype=torch.float32", "data.seq_len=64", "data.micro_bsz=2", "data.micro_num=2",
         "data.train_folder=None", "data.valid_folder=None", "data.tokenizer_path=None", "data.valid_every=0",
         "data.total_steps=4", "lr_scheduler.total_steps=4", "ckpt.checkpoint_every=2"]


def test_moe_config_trains_resumes_and_exports_to_mixtral(tmp_path):
    from transformers import AutoModelForCausalLM

    from internlm.inference import load_model

    ckpt = tmp_path / "ckpt"
    cfg = ROOT / "configs" / "1.8B_MoE16_sft.py"
    args = SMALL + [f"ckpt.save_ckpt_folder={str(ckpt)!r}", "ckpt.enable_save_ckpt=True"]
    run = launcher.run(2, args + ["data.total_steps=2"], tmp_path / "a", config=cfg, timeout=240)
    assert run.returncode == 0, run.tail()
    assert "model INTERNLM_MoE" in run.stdout
    first = run.records
    assert [r["step"] for r in first] == [1, 2]
    for r in first:
        assert 1.0 <= r["moe_loss"] / 2 < 4.0  # two layers; 1.0 each when perfectly balanced
        assert r["moe_imbalance"] >= 1.0 and r["moe_dropped"] >= 0
        assert sum(r["moe_load"]["layer0"]["tokens"].values()) == 2 * 2 * 2 * 64 * 2  # top-2 x dp2 x micro
    # resumed in one process: steps 3 and 4 go on from the checkpoint of step 2
    again = launcher.run(1, args, tmp_path / "b", config=cfg, timeout=240)
    assert again.returncode == 0, again.tail()
    assert [r["step"] for r in again.records] == [3, 4] and "resum" in again.stdout.lower()
    assert all(math.isfinite(r["loss"]) for r in again.records)
    # export: Mixtral, same logits as the checkpoint where GShard drops nothing (2 tokens: 4 assignments,
    # min_capacity 4)
    out = tmp_path / "hf"
    conv = run_python([ROOT / "tools" / "convert2hf.py", "--src", ckpt / "4", "--tgt", out, "--dtype", "float32",
                       "--no_progress"])
    assert conv.returncode == 0, conv.stderr
    assert "as transformers 'mixtral'" in conv.stdout and "drops tokens" in conv.stdout
    ids = torch.randint(0, 128, (1, 2), generator=torch.Generator().manual_seed(0))
    ours = load_model(ckpt / "4")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    # longer inputs: equal to the same weights routed dropless (Mixtral's routing), not to GShard's drops
    from internlm.model.moe import moe_layers

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gshard = ours(ids)
        assert sum(int(m.stats["dropped"]) for _, m in moe_layers(ours)) > 0
        for _, m in moe_layers(ours):
            m.drop = False
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(gshard, ours(ids), atol=1e-4)
