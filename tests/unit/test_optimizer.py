"""HybridZeroOptimizer in one process: grad norm, clipping, fp16 skip-on-overflow, param groups."""
import math

import pytest
import torch
from torch import nn

from internlm.config import AdamConfig
from internlm.config.schema import FP16ScalerConfig, GradScalerConfig
from internlm.optim.hybrid_zero import HybridZeroOptimizer

ADAM = AdamConfig(lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm_weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.norm_weight


def make(clip=1.0, scaler=None):
    """`scaler` (a GradScalerConfig) makes it an fp16 optimizer with dynamic loss scaling."""
    torch.manual_seed(0)
    net = Net()
    opt = HybridZeroOptimizer([net], ADAM, clip, stage_world_size=1, device=torch.device("cpu"), grad_scaler=scaler)
    return net, opt


def backward(net, scale=1.0):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * 10
    (net(x).pow(2).mean() * scale).backward()


def test_grad_norm_matches_torch():
    net, opt = make()
    backward(net)
    ref = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).item()
    assert opt.global_grad_norm() == pytest.approx(ref, rel=1e-6)


def test_clipping_equals_adamw_on_clipped_grads():
    net, opt = make(clip=0.5)
    ref_net = Net()
    ref_net.load_state_dict(net.state_dict())
    ref_opt = torch.optim.AdamW([
        {"params": [ref_net.lin.weight], "weight_decay": 0.1},
        {"params": [ref_net.lin.bias, ref_net.norm_weight], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        backward(net)
        backward(ref_net)
        norm = torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 0.5).item()
        stepped, got = opt.step()
        ref_opt.step()
        ref_opt.zero_grad()
        assert stepped and got == pytest.approx(norm, rel=1e-6)
        assert norm > 0.5  # clipping was active
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_norms_and_biases_are_not_decayed():
    net, opt = make()
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(net.lin.weight)] == 0.1
    assert decay[id(net.lin.bias)] == 0.0 and decay[id(net.norm_weight)] == 0.0


def test_fp16_overflow_skips_and_backs_off():
    net, opt = make(scaler=GradScalerConfig(fp16=FP16ScalerConfig(initial_scale=1024.0), hysteresis=1,
                                            backoff_factor=0.5))
    before = [p.detach().clone() for p in net.parameters()]
    assert opt.loss_scale == 1024.0
    backward(net, scale=opt.loss_scale)
    net.lin.weight.grad[0, 0] = float("inf")
    stepped, norm = opt.step()
    assert not stepped and not math.isfinite(norm)
    assert opt.skipped_steps == 1 and opt.loss_scale == 512.0
    assert all(p.grad is None for p in net.parameters())
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b)
    # a finite step afterwards reports the unscaled norm and updates the weights
    backward(net, scale=opt.loss_scale)
    scaled = opt.global_grad_norm()
    backward_net, _ = make()
    backward(backward_net)
    ref = torch.nn.utils.get_total_norm([p.grad for p in backward_net.parameters()]).item()
    assert scaled == pytest.approx(ref * 512.0, rel=1e-5)
    stepped, norm = opt.step()
    assert stepped and norm == pytest.approx(ref, rel=1e-5)
    assert not torch.equal(net.lin.weight, before[0])
    assert opt.state_dict()["skipped_steps"] == 1
