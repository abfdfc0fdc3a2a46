"""The stateful, layout-independent batch sampler."""

import itertools

import numpy as np
import pytest

from internlm.data.sampler import StatefulBatchSampler

NUM_ROWS = 103
MICRO_BSZ = 2
DP_TIMES_MICRO = 4  # dp_size * micro_num, fixed across layouts
SEED = 11


def sampler(dp_size=1, dp_rank=0, **kw):
    args = dict(num_rows=NUM_ROWS, micro_num=DP_TIMES_MICRO // dp_size, micro_bsz=MICRO_BSZ, seed=SEED)
    args.update(kw)
    return StatefulBatchSampler(dp_rank=dp_rank, dp_size=dp_size, **args)


def global_steps(dp_size, num_steps, state=None):
    """Global step batches (list of micro-batches in order) gathered from every rank of a layout."""
    ranks = [sampler(dp_size, r) for r in range(dp_size)]
    if state is not None:
        for s in ranks:
            s.load_state_dict(state)
    steps = []
    for _ in range(num_steps):
        step = []
        for s in ranks:
            step += next(s)
        steps.append(step)
    return steps, ranks


def test_step_shape():
    s = sampler(dp_size=2, dp_rank=1)
    step = next(s)
    assert len(step) == 2 and all(len(mb) == MICRO_BSZ for mb in step)
    assert all(isinstance(i, int) for mb in step for i in mb)
    assert s.steps_per_epoch == NUM_ROWS // (DP_TIMES_MICRO * MICRO_BSZ)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_layout_independent_order(dp_size):
    want, _ = global_steps(1, 30)
    got, _ = global_steps(dp_size, 30)
    assert got == want


def test_epochs_cover_rows_once_and_reshuffle():
    s = sampler()
    per_epoch = s.steps_per_epoch
    epochs = []
    for _ in range(3):
        rows = [i for _ in range(per_epoch) for mb in next(s) for i in mb]
        assert len(rows) == len(set(rows)) == per_epoch * DP_TIMES_MICRO * MICRO_BSZ
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2]
    # Each epoch is the prefix of a permutation seeded with seed + epoch: reproducible anywhere.
    for epoch, rows in enumerate(epochs):
        np.testing.assert_array_equal(rows, np.random.default_rng(SEED + epoch).permutation(NUM_ROWS)[: len(rows)])
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["rows_consumed_in_epoch"] == 0


def test_no_shuffle_is_identity_order():
    s = sampler(shuffle=False)
    rows = [i for _ in range(s.steps_per_epoch) for mb in next(s) for i in mb]
    assert rows == list(range(len(rows)))
    assert [i for mb in next(s) for i in mb] == list(range(DP_TIMES_MICRO * MICRO_BSZ))


def test_drop_last_false_sees_every_row():
    s = sampler(drop_last=False)
    assert s.steps_per_epoch == NUM_ROWS // 8 + 1
    rows = [i for _ in range(s.steps_per_epoch) for mb in next(s) for i in mb]
    assert set(rows) == set(range(NUM_ROWS))
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["rows_consumed_in_epoch"] == 0


@pytest.mark.parametrize("k", [0, 3, 12, 13, 25])
@pytest.mark.parametrize("resume_dp", [1, 2, 4])
def test_resume_matches_uninterrupted(k, resume_dp):
    uninterrupted, _ = global_steps(2, k + 20)
    _, ranks = global_steps(2, k)
    state = ranks[0].state_dict()
    assert all(r.state_dict() == state for r in ranks)  # the state does not depend on the rank
    assert set(state) == {"epoch", "rows_consumed_in_epoch", "seed", "num_rows", "global_rows_per_step"}
    resumed, _ = global_steps(resume_dp, 20, state=state)
    assert resumed == uninterrupted[k:]


def test_resume_with_another_global_batch_keeps_the_row_position():
    s = sampler()
    for _ in range(5):
        next(s)
    state = s.state_dict()
    bigger = StatefulBatchSampler(NUM_ROWS, micro_num=4, micro_bsz=3, dp_rank=0, dp_size=1, seed=SEED)
    with pytest.warns(UserWarning, match="global batch changed"):
        bigger.load_state_dict(state)
    order = np.random.default_rng(SEED).permutation(NUM_ROWS)
    assert [i for mb in next(bigger) for i in mb] == order[40:52].tolist()


def test_num_rows_mismatch_raises():
    state = sampler().state_dict()
    other = StatefulBatchSampler(NUM_ROWS + 1, DP_TIMES_MICRO, MICRO_BSZ, 0, 1, SEED)
    with pytest.raises(ValueError, match="packed rows"):
        other.load_state_dict(state)


def test_too_few_rows_and_bad_rank():
    with pytest.raises(ValueError, match="cannot fill one global step"):
        StatefulBatchSampler(7, micro_num=2, micro_bsz=2, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        StatefulBatchSampler(100, micro_num=2, micro_bsz=2, dp_rank=2, dp_size=2, seed=0)


def test_independent_samplers_agree():
    a, b = sampler(), sampler()
    assert list(itertools.islice(a, 40)) == list(itertools.islice(b, 40))
