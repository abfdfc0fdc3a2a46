"""Packing, the dummy source, and the train/valid loaders."""

import time

import numpy as np
import pytest
import torch

from internlm.data.loader import BATCH_KEYS, build_train_loader, build_valid_loader
from internlm.data.packed import IGNORE_INDEX, DummySource, PackedDataset, cu_seqlens_from_position_ids


class ListSource:
    """In-memory sample source with the interface of TokenizedFolder."""

    type_names = ["en", "code", "zh"]

    def __init__(self, samples, types=None):
        self.samples = [np.asarray(s, dtype=np.int64) for s in samples]
        self.types = list(types) if types is not None else [i % 3 for i in range(len(samples))]
        self.lengths = np.array([len(s) for s in self.samples], dtype=np.int64)
        self.reads = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        self.reads += 1
        return self.samples[i], self.types[i]


class LengthOnlySource:
    """Many samples whose tokens are made on demand; checks that packing never reads them all."""

    type_names = ["only"]

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.reads = 0

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        self.reads += 1
        return np.full(int(self.lengths[i]), i, dtype=np.int64), 0


def random_source(seed=0, num=60, low=1, high=40):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num):
        # Unique token values (sample * 1000 + position) make every token traceable to its origin.
        n = int(rng.integers(low, high))
        samples.append(np.arange(n) + 1000 * i)
    return ListSource(samples)


def all_rows(ds):
    return [ds[r] for r in range(len(ds))]


@pytest.mark.parametrize("packed_length", [1, 7, 32, 100])
def test_rows_are_the_stream_prefix(packed_length):
    src = random_source()
    ds = PackedDataset(src, packed_length)
    stream = np.concatenate(src.samples)
    assert len(ds) == len(stream) // packed_length
    rows = all_rows(ds)
    for row in rows:
        for key in BATCH_KEYS:
            assert row[key].dtype == np.int64 and row[key].shape == (packed_length,)
    got = np.concatenate([row["input_ids"] for row in rows])
    np.testing.assert_array_equal(got, stream[: len(ds) * packed_length])


def reference_row(samples, types, packed_length, row):
    """Straightforward per-token construction to compare the vectorised packing against."""
    sample_of, pos_in_sample = [], []
    for s, tokens in enumerate(samples):
        sample_of += [s] * len(tokens)
        pos_in_sample += list(range(len(tokens)))
    start = row * packed_length
    ids, labels, positions, type_ids = [], [], [], []
    for t in range(start, start + packed_length):
        s, p = sample_of[t], pos_in_sample[t]
        piece_start = max(start, t - p)
        ids.append(samples[s][p])
        positions.append(t - piece_start)
        type_ids.append(types[s])
        same_piece_next = t + 1 < start + packed_length and sample_of[t + 1] == s
        labels.append(samples[s][p + 1] if same_piece_next else IGNORE_INDEX)
    return ids, labels, positions, type_ids


@pytest.mark.parametrize("packed_length", [5, 16, 64])
def test_labels_positions_types_match_reference(packed_length):
    src = random_source(seed=1)
    ds = PackedDataset(src, packed_length)
    for r in range(len(ds)):
        ids, labels, positions, type_ids = reference_row(src.samples, src.types, packed_length, r)
        row = ds[r]
        np.testing.assert_array_equal(row["input_ids"], ids)
        np.testing.assert_array_equal(row["labels"], labels)
        np.testing.assert_array_equal(row["position_ids"], positions)
        np.testing.assert_array_equal(row["type_ids"], type_ids)


def test_labels_never_cross_a_sample_boundary():
    src = random_source(seed=2)
    ds = PackedDataset(src, 24)
    for row in all_rows(ds):
        for t in range(24):
            label = row["labels"][t]
            if label == IGNORE_INDEX:
                continue
            # Tokens are sample * 1000 + position: the label is the next token of the same sample.
            assert label == row["input_ids"][t] + 1
            assert label // 1000 == row["input_ids"][t] // 1000
        # Each piece ends with an ignored label, in particular the row's last token.
        assert row["labels"][-1] == IGNORE_INDEX
        starts = np.flatnonzero(row["position_ids"] == 0)
        assert starts[0] == 0
        assert np.all(row["labels"][starts[1:] - 1] == IGNORE_INDEX)


def test_min_length_drops_short_samples():
    src = random_source(seed=3, low=1, high=30)
    min_length = 12
    ds = PackedDataset(src, 10, min_length=min_length)
    kept = [s for s in src.samples if len(s) >= min_length]
    assert 0 < len(kept) < len(src.samples)
    assert ds.num_dropped_samples == len(src.samples) - len(kept)
    stream = np.concatenate(kept)
    assert len(ds) == len(stream) // 10
    got = np.concatenate([row["input_ids"] for row in all_rows(ds)])
    np.testing.assert_array_equal(got, stream[: len(got)])
    # Pieces only come from kept samples.
    for r in range(len(ds)):
        for index, _, _, _ in ds.pieces(r):
            assert src.lengths[index] >= min_length


def test_pack_sample_into_one():
    src = random_source(seed=4)
    ds = PackedDataset(src, 20, pack_sample_into_one=True)
    plain = PackedDataset(src, 20)
    stream = np.concatenate(src.samples)
    for r in range(len(ds)):
        row = ds[r]
        np.testing.assert_array_equal(row["input_ids"], plain[r]["input_ids"])
        np.testing.assert_array_equal(row["type_ids"], plain[r]["type_ids"])
        np.testing.assert_array_equal(row["position_ids"], np.arange(20))
        np.testing.assert_array_equal(row["labels"][:-1], stream[r * 20 + 1 : (r + 1) * 20])
        assert row["labels"][-1] == IGNORE_INDEX


def test_type_ids_follow_samples():
    src = random_source(seed=5)
    ds = PackedDataset(src, 13)
    for row in all_rows(ds):
        origin = row["input_ids"] // 1000
        np.testing.assert_array_equal(row["type_ids"], np.asarray(src.types)[origin])


def test_deterministic_and_reads_only_needed_samples():
    src = random_source(seed=6)
    a = all_rows(PackedDataset(src, 17))
    b = [PackedDataset(random_source(seed=6), 17)[r] for r in reversed(range(len(a)))][::-1]
    for x, y in zip(a, b):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])

    big = LengthOnlySource(np.full(10_000, 10))
    ds = PackedDataset(big, 25)
    assert big.reads == 0
    row = ds[1234]  # tokens 30850..30874 of the stream: samples 3085, 3086, 3087
    assert big.reads == 3
    np.testing.assert_array_equal(np.unique(row["input_ids"]), [3085, 3086, 3087])


def test_row_index_errors():
    ds = PackedDataset(random_source(), 8)
    with pytest.raises(IndexError):
        ds[len(ds)]
    np.testing.assert_array_equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])


def test_length_mismatch_is_reported():
    src = random_source()
    src.lengths = src.lengths.copy()
    src.lengths[0] += 1
    with pytest.raises(ValueError, match="tokens but source.lengths"):
        PackedDataset(src, 8)[0]


def test_packing_index_is_fast():
    lengths = np.random.default_rng(0).integers(1, 64, size=200_000)
    src = LengthOnlySource(lengths)
    t0 = time.perf_counter()
    ds = PackedDataset(src, 2048)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, elapsed
    assert len(ds) == int(lengths.sum()) // 2048
    assert src.reads == 0
    ds[len(ds) - 1]


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
    cu = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 10]
    # A chunk that starts mid-sequence still starts a sequence.
    assert cu_seqlens_from_position_ids(torch.tensor([5, 6, 0, 1])).tolist() == [0, 2, 4]
    assert cu_seqlens_from_position_ids(torch.tensor([[0, 1], [0, 1]])).tolist() == [0, 2, 4]


def test_dummy_source():
    src = DummySource(vocab_size=100, num_samples=50, seed=3, min_len=8, max_len=40)
    assert len(src) == 50 and src.type_names == ["dummy_a", "dummy_b"]
    assert src.lengths.min() >= 8 and src.lengths.max() <= 40
    again = DummySource(vocab_size=100, num_samples=50, seed=3, min_len=8, max_len=40)
    other = DummySource(vocab_size=100, num_samples=50, seed=4, min_len=8, max_len=40)
    differs = False
    for i in reversed(range(len(src))):
        tokens, type_id = src[i]
        assert tokens.dtype == np.int64 and len(tokens) == src.lengths[i]
        assert tokens.min() >= 0 and tokens.max() < 100
        assert tokens[0] == src.bos_id and tokens[-1] == src.eos_id
        assert type_id == i % 2
        np.testing.assert_array_equal(tokens, again[i][0])
        if len(other[i][0]) != len(tokens) or not np.array_equal(other[i][0], tokens):
            differs = True
    assert differs
    ds = PackedDataset(src, 32)
    assert len(ds) == int(src.lengths.sum()) // 32


# ----------------------------------------------------------------------------------------- loaders


def test_train_loader_shapes_and_dtypes():
    src = DummySource(vocab_size=64, num_samples=400, seed=0, max_len=50)
    loader = build_train_loader(src, packed_length=16, micro_num=3, micro_bsz=2, dp_rank=0, dp_size=2, seed=7)
    assert loader.tokens_per_step_global == 2 * 3 * 2 * 16
    assert loader.type_names == ["dummy_a", "dummy_b"]
    batch = next(loader)
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].dtype == torch.int64
        assert batch[key].shape == (3, 2 * 16)
    # Each micro-batch is micro_bsz packed rows laid end to end.
    rows = loader.sampler.epoch_order(0)[:2]
    for j, r in enumerate(rows):
        np.testing.assert_array_equal(batch["input_ids"][0, j * 16 : (j + 1) * 16].numpy(),
                                      loader.dataset[r]["input_ids"])
        assert batch["position_ids"][0, j * 16] == 0
        assert batch["labels"][0, (j + 1) * 16 - 1] == IGNORE_INDEX
    assert loader.state_dict()["rows_consumed_in_epoch"] == 12


def test_train_loader_dp_sharding_matches_single_rank():
    src = DummySource(vocab_size=64, num_samples=300, seed=1, max_len=40)
    kw = dict(packed_length=8, micro_bsz=2, seed=3)
    single = build_train_loader(src, micro_num=4, dp_rank=0, dp_size=1, **kw)
    ranks = [build_train_loader(src, micro_num=2, dp_rank=r, dp_size=2, **kw) for r in range(2)]
    for _ in range(5):
        want = next(single)
        got = [next(loader) for loader in ranks]
        for key in BATCH_KEYS:
            torch.testing.assert_close(torch.cat([g[key] for g in got]), want[key], rtol=0, atol=0)

    # Resume a 2-rank run's state into a 4-rank run with the same global batch.
    state = ranks[0].state_dict()
    four = [build_train_loader(src, micro_num=1, dp_rank=r, dp_size=4, **kw) for r in range(4)]
    for loader in four:
        loader.load_state_dict(state)
    want = next(single)
    got = [next(loader) for loader in four]
    torch.testing.assert_close(torch.cat([g["input_ids"] for g in got]), want["input_ids"], rtol=0, atol=0)


def test_valid_loader_equal_counts_and_coverage():
    src = DummySource(vocab_size=64, num_samples=97, seed=2, max_len=30)
    packed_length, micro_bsz = 8, 3
    ds = PackedDataset(src, packed_length)
    whole = build_valid_loader(src, packed_length, micro_bsz, valid_micro_num=0, dp_rank=0, dp_size=1)
    assert len(whole) == len(ds) // micro_bsz
    for dp_size in (1, 2, 3, 4):
        per_rank = [build_valid_loader(src, packed_length, micro_bsz, 0, r, dp_size) for r in range(dp_size)]
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1
        assert counts.pop() == (len(ds) // micro_bsz) // dp_size
        flat = [b for batches in per_rank for b in batches]
        n = len(flat)
        picked = [(i * len(whole)) // n for i in range(n)]  # spread evenly, distinct, in order
        assert len(set(picked)) == n
        for got, i in zip(flat, picked):
            for key in BATCH_KEYS:
                assert got[key].shape == (1, micro_bsz * packed_length)
                torch.testing.assert_close(got[key], whole[i][key], rtol=0, atol=0)
    # a capped pass samples the whole set, not its first micro-batches (e.g. one type of several)
    capped = [build_valid_loader(src, packed_length, micro_bsz, 2, r, 2) for r in range(2)]
    assert [len(b) for b in capped] == [2, 2]
    last = capped[1][1]["input_ids"]
    assert torch.equal(last, whole[(3 * len(whole)) // 4]["input_ids"])
    with pytest.warns(UserWarning, match="validation is skipped"):
        assert build_valid_loader(src, packed_length, micro_bsz=1000, valid_micro_num=1, dp_rank=0, dp_size=1) == []


# ---- loss masks: a negative id is the token in the input and never a target ---------------------

def masked_source(seed=3, num=40):
    """Samples with a prompt of negative ids and an answer of positive ones, as SFT data is stored."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num):
        prompt = rng.integers(3, 100, size=int(rng.integers(1, 12)))
        answer = rng.integers(3, 100, size=int(rng.integers(1, 12)))
        samples.append(np.concatenate([-prompt, answer]))
    return ListSource(samples)


@pytest.mark.parametrize("packed_length", [7, 16, 64])
@pytest.mark.parametrize("into_one", [False, True])
def test_masked_tokens_are_inputs_but_never_targets(packed_length, into_one):
    src = masked_source()
    ds = PackedDataset(src, packed_length, pack_sample_into_one=into_one)
    stream = np.concatenate(src.samples)  # the signed token stream the rows are cut from
    targets = 0
    for r in range(len(ds)):
        row = ds[r]
        signed = stream[r * packed_length:(r + 1) * packed_length]
        assert (row["input_ids"] == np.abs(signed)).all() and (row["input_ids"] >= 0).all()
        # where the next token is masked the label is ignored; elsewhere it is what it was unmasked
        masked_next = signed[1:] < 0
        assert (row["labels"][:-1][masked_next] == IGNORE_INDEX).all()
        unmasked = PackedDataset(ListSource([np.abs(s) for s in src.samples], src.types), packed_length,
                                 pack_sample_into_one=into_one)[r]
        keep = ~masked_next
        assert (row["labels"][:-1][keep] == unmasked["labels"][:-1][keep]).all()
        assert (row["position_ids"] == unmasked["position_ids"]).all()
        targets += int((row["labels"] != IGNORE_INDEX).sum())
    assert targets > 0
    # every label that survives is a positive (answer) token of the stream
    labels = np.concatenate([ds[r]["labels"] for r in range(len(ds))])
    assert set(labels[labels != IGNORE_INDEX].tolist()) <= set(stream[stream > 0].tolist())


def test_masked_loss_counts_only_answer_tokens():
    from internlm.loss import PackedLMLoss, make_target

    src = masked_source(num=10)
    ds = PackedDataset(src, 32)
    row = ds[0]
    logits = torch.randn(1, 32, 100)
    loss_fn = PackedLMLoss(3)
    labels = torch.from_numpy(row["labels"])[None]
    loss = loss_fn(logits, make_target(labels, torch.from_numpy(row["type_ids"])[None]))
    keep = labels[0] != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[0][keep], labels[0][keep])
    torch.testing.assert_close(loss, expected)
    assert int(loss_fn.summed()[2 + 3:].sum()) == int(keep.sum()) < 31
