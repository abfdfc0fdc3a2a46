import math

import pytest
import torch

from internlm.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from internlm.optim.lr import Beta2Scheduler, WarmupCosineLR, lr_at


def _optimizer(lrs=(1e-3,), betas=(0.9, 0.95)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups, betas=betas)


# ---------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-4),  # the first update already uses base/warmup, as in InternEvo
        (4, 5e-4),
        (9, 1e-3),  # warmup ends at base on update warmup_steps - 1
        (10, 1e-3),  # cosine phase starts at base
        (55, 1e-5 + (1e-3 - 1e-5) * 0.5),  # half way through the cosine
        (100, 1e-5),
        (250, 1e-5),  # held at eta_min after total_steps
    ],
)
def test_lr_at_hand_values(step, expected):
    assert lr_at(step, 1e-3, total_steps=100, warmup_steps=10, eta_min=1e-5) == pytest.approx(expected, abs=1e-15)


def test_lr_at_cosine_point_and_init_steps():
    # 1/3 of the way through the cosine phase: (1 + cos(pi/3)) / 2 = 0.75
    assert lr_at(40, 2.0, total_steps=100, warmup_steps=10, eta_min=0.0) == pytest.approx(1.5)
    # init_steps of lr 0, then warmup counted from there; cosine spans total - init - warmup
    args = dict(base_lr=1.0, total_steps=21, warmup_steps=4, eta_min=0.0, init_steps=3)
    assert [lr_at(s, **args) for s in range(8)] == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_at(14, **args) == pytest.approx(0.5)  # cosine over steps 7..21
    # no warmup: straight cosine from base
    assert lr_at(0, 1.0, total_steps=10, warmup_steps=0, eta_min=0.0) == 1.0


def test_cosine_phase_matches_torch_cosine_annealing():
    total, warmup, base, eta_min = 50, 5, 3e-4, 3e-6
    ref_opt = _optimizer((base,))
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warmup, eta_min=eta_min)
    for k in range(total - warmup + 1):
        assert lr_at(warmup + k, base, total, warmup, eta_min) == pytest.approx(ref.get_last_lr()[0], rel=1e-9)
        ref_opt.step()
        ref.step()


def test_warmup_cosine_scheduler_sequence_per_group():
    opt = _optimizer((1e-3, 5e-4))
    sched = WarmupCosineLR(opt, total_steps=40, warmup_ratio=0.125, eta_min=1e-5)  # warmup = 5
    assert sched.warmup_steps == 5
    for step in range(45):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([lr_at(step, b, 40, 5, 1e-5) for b in (1e-3, 5e-4)], rel=1e-12)
        assert sched.get_last_lr() == pytest.approx(lrs)
        opt.step()
        sched.step()


def test_warmup_cosine_state_dict_round_trip():
    def run(sched, opt, n):
        out = []
        for _ in range(n):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    opt = _optimizer()
    sched = WarmupCosineLR(opt, total_steps=60, warmup_ratio=0.1, eta_min=1e-6, init_steps=2)
    run(sched, opt, 17)
    state = sched.state_dict()
    expected = run(sched, opt, 30)

    opt2 = _optimizer()
    sched2 = WarmupCosineLR(opt2, total_steps=60, warmup_ratio=0.1, eta_min=1e-6, init_steps=2)
    sched2.load_state_dict(state)
    assert run(sched2, opt2, 30) == expected


# ---------------------------------------------------------------------------- beta2


def test_beta2_schedule_values():
    opt = _optimizer(betas=(0.9, 0.95))
    sched = Beta2Scheduler(opt, init_beta2=0.95, c=0.8)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)  # construction changes nothing
    seen = []
    for _ in range(100):
        sched.step()
        seen.append(opt.param_groups[0]["betas"])
    assert all(beta1 == 0.9 for beta1, _ in seen)
    # t = 1: 1 - 1 = 0 -> init_beta2;  1 - 42**-0.8 < 0.95 < 1 - 43**-0.8
    assert seen[0][1] == 0.95
    assert seen[41][1] == 0.95
    assert seen[42][1] == pytest.approx(1 - 43**-0.8)
    assert seen[99][1] == pytest.approx(1 - 100**-0.8)  # 0.97488
    assert seen[99][1] == pytest.approx(0.974881, abs=1e-6)
    # explicit iteration
    sched.step(1000)
    assert opt.param_groups[0]["betas"][1] == pytest.approx(1 - 1000**-0.8)


def test_beta2_disabled_and_round_trip():
    opt = _optimizer(betas=(0.9, 0.95))
    off = Beta2Scheduler(opt, init_beta2=0.95, c=0)
    for _ in range(500):
        off.step()
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)

    sched = Beta2Scheduler(_optimizer(), init_beta2=0.95, c=0.8)
    for _ in range(70):
        sched.step()
    state = sched.state_dict()
    opt2 = _optimizer()
    sched2 = Beta2Scheduler(opt2, init_beta2=0.5, c=0.1)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["betas"][1] == pytest.approx(1 - 70**-0.8)
    sched.step()
    sched2.step()
    assert sched2.get_beta2() == sched.get_beta2() == pytest.approx(1 - 71**-0.8)


# ---------------------------------------------------------------------------- grad scaler


def _run(scaler, pattern):
    out = []
    for found_inf in pattern:
        scaler.update(found_inf)
        out.append(scaler.scale)
    return out


def test_grad_scaler_hysteresis_backoff_growth():
    s = DynamicGradScaler(initial_scale=2**16, growth_interval=3, hysteresis=2)
    assert s.scale == 65536.0 and isinstance(s.scale, float)
    assert s.inv_scale == 1 / 65536
    # first overflow is absorbed by hysteresis, the second and later ones back off
    assert _run(s, [True, True, True]) == [2**16, 2**15, 2**14]
    # clean steps do not reset the hysteresis count: the next overflow backs off at once
    assert _run(s, [False, True]) == [2**14, 2**13]
    # growth after growth_interval consecutive clean steps, which also resets hysteresis
    assert _run(s, [False, False, False]) == [2**13, 2**13, 2**14]
    assert _run(s, [True, False, False, False, True, True]) == [2**14, 2**14, 2**14, 2**15, 2**15, 2**14]


def test_grad_scaler_bounds_and_no_hysteresis():
    s = DynamicGradScaler(initial_scale=4, min_scale=1, hysteresis=1, growth_interval=1, max_scale=16)
    assert _run(s, [True, True, True, True]) == [2, 1, 1, 1]
    assert _run(s, [False] * 6) == [2, 4, 8, 16, 16, 16]
    s0 = DynamicGradScaler(initial_scale=8, hysteresis=0, min_scale=None, max_scale=None)
    assert _run(s0, [True, True, True, True]) == [4, 2, 1, 0.5]
    with pytest.raises(ValueError):
        DynamicGradScaler(backoff_factor=1.5)


def test_grad_scaler_state_round_trip():
    pattern = [True, False, False, True, True, False] + [False] * 7 + [True, False, True]
    s = DynamicGradScaler(initial_scale=2**10, growth_interval=4, hysteresis=3)
    _run(s, pattern[:8])
    state = s.state_dict()
    assert set(state) == {"_scale", "_growth_step", "_hysteresis_step"}  # InternEvo's key names
    expected = _run(s, pattern[8:])

    s2 = DynamicGradScaler(initial_scale=2**16, growth_interval=4, hysteresis=3)
    s2.load_state_dict({**state, "_scale": torch.tensor([state["_scale"]])})  # InternEvo-style tensor too
    assert _run(s2, pattern[8:]) == expected


def test_constant_scaler():
    c = ConstantGradScaler()
    c.update(True)
    assert c.scale == 1.0 and c.inv_scale == 1.0 and c.state_dict() == {}
    assert math.isclose(ConstantGradScaler(4.0).inv_scale, 0.25)
