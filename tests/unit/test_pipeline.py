"""The pipeline split of internlm/pipeline.py in one process: which stages a rank holds in each
schedule mode, which layers a stage holds, and that the stage modules, built and initialised as the
trainer does (on the meta device, then `init_parameters` per stage), compose to the whole model.
The schedules themselves run in tests/parallel/test_parity.py (pp2_* layouts)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from internlm import pipeline
from internlm.config import ConfigError, config_from_dict
from internlm.model.internlm import InternLM
from internlm.parallelize import init_parameters
from tests.helpers import tiny_config, tiny_model_args

SEED = 11

# ---------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("pp, chunks, mode, want", [
    (2, 1, "1f1b", [[0], [1]]),
    (4, 1, "gpipe", [[0], [1], [2], [3]]),
    (2, 2, "1f1b", [[0, 2], [1, 3]]),  # interleaved: looped placement
    (4, 2, "zbh1", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    (2, 3, "1f1b", [[0, 2, 4], [1, 3, 5]]),
    (2, 2, "zbv", [[0, 3], [1, 2]]),  # V shape: the first and the last stage on rank 0
    (4, 2, "zbv", [[0, 7], [1, 6], [2, 5], [3, 4]]),
])
def test_stage_ids_of_rank(pp, chunks, mode, want):
    got = [pipeline.stage_ids_of_rank(r, pp, chunks, mode) for r in range(pp)]
    assert got == want
    assert sorted(itertools.chain(*got)) == list(range(pp * chunks))  # every stage on exactly one rank


def test_zbv_neighbouring_stages_share_a_rank_at_the_turn():
    """In the V, the last stage of the way down and the first of the way up are on the last rank, and
    rank 0 holds both the embedding's stage and the head's (the schedule's loss runs on rank 0)."""
    for pp in (2, 3, 4):
        ids = [pipeline.stage_ids_of_rank(r, pp, 2, "zbv") for r in range(pp)]
        assert ids[-1] == [pp - 1, pp]
        assert 0 in ids[0] and 2 * pp - 1 in ids[0]


@pytest.mark.parametrize("mode, chunks, cls", [
    ("1f1b", 1, Schedule1F1B),
    ("1f1b", 2, ScheduleInterleaved1F1B),  # interleaved when a rank holds several stages
    ("gpipe", 1, ScheduleGPipe),
    ("zbh1", 2, ScheduleInterleavedZeroBubble),
    ("zbv", 2, ScheduleZBVZeroBubble),
])
def test_schedule_class(mode, chunks, cls):
    assert pipeline.schedule_class(mode, chunks) is cls


# ---------------------------------------------------------------------------------------- layer split

@pytest.mark.parametrize("num_layers, num_stages", [(4, 2), (4, 4), (8, 4), (5, 2), (7, 3), (32, 8)])
def test_layer_range_covers_every_layer_once_in_order(num_layers, num_stages):
    ranges = [pipeline.layer_range(s, num_stages, num_layers) for s in range(num_stages)]
    assert list(itertools.chain(*ranges)) == list(range(num_layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_layer_range_examples():
    assert pipeline.layer_range(0, 4, 8) == range(0, 2) and pipeline.layer_range(3, 4, 8) == range(6, 8)
    assert pipeline.layer_range(0, 2, 5) == range(0, 3) and pipeline.layer_range(1, 2, 5) == range(3, 5)
    assert pipeline.layer_range(0, 1, 4) == range(0, 4)  # no pipeline: one stage holds everything


def _meta_model(**kw) -> InternLM:
    with torch.device("meta"):
        return InternLM(tiny_model_args(**kw))


def _names(module) -> set[str]:
    return set(dict(module.named_parameters()).keys())


def test_build_stage_module_keeps_global_names():
    full = _meta_model()
    stages = [pipeline.build_stage_module(full, s, 4) for s in range(4)]
    assert [list(s.layers.keys()) for s in stages] == [["0"], ["1"], ["2"], ["3"]]
    assert stages[0].tok_embeddings is not None and stages[0].output is None and stages[0].norm is None
    assert stages[3].tok_embeddings is None and stages[3].output is not None and stages[3].norm is not None
    names = set(itertools.chain(*(dict(s.named_parameters()).keys() for s in stages)))
    assert names == set(dict(full.named_parameters()).keys())  # the union is the whole model, names unchanged


@pytest.mark.parametrize("num_layers, num_stages", [(4, 2), (5, 2), (4, 4), (6, 3)])
def test_stages_partition_the_parameters(num_layers, num_stages):
    """Each parameter of the model is in exactly one stage, under its own name and shape; a middle
    stage holds layers only; the model the stages are cut from is left whole."""
    full = _meta_model(num_layers=num_layers)
    shapes = {n: p.shape for n, p in full.named_parameters()}
    stages = [pipeline.build_stage_module(full, s, num_stages) for s in range(num_stages)]
    seen: list[str] = []
    for sid, stage in enumerate(stages):
        params = dict(stage.named_parameters())
        seen += params
        assert all(params[n].shape == shapes[n] for n in params)
        assert list(stage.layers.keys()) == [str(i) for i in pipeline.layer_range(sid, num_stages, num_layers)]
        assert {n.split(".")[0] for n in params} == ({"layers"} | ({"tok_embeddings"} if sid == 0 else set())
                                                     | ({"norm", "output"} if sid == num_stages - 1 else set()))
    assert sorted(seen) == sorted(shapes)  # no parameter twice, none missing
    assert list(full.layers.keys()) == [str(i) for i in range(num_layers)]
    assert full.tok_embeddings is not None and full.output is not None


@pytest.mark.parametrize("pp, chunks, mode", [(2, 2, "1f1b"), (2, 2, "zbv")])
def test_a_ranks_stage_modules(pp, chunks, mode):
    """The modules one rank builds for its stages: under zbv rank 0 holds the embedding (stage 0)
    and the head (the last stage); interleaved, rank 0 holds layers 0 and 2 and rank 1 the head."""
    full = _meta_model()
    num_stages = pp * chunks
    held = {r: [pipeline.build_stage_module(full, s, num_stages)
                for s in pipeline.stage_ids_of_rank(r, pp, chunks, mode)] for r in range(pp)}
    layers = {r: [list(m.layers.keys()) for m in mods] for r, mods in held.items()}
    if mode == "zbv":
        assert layers == {0: [["0"], ["3"]], 1: [["1"], ["2"]]}
        assert held[0][0].tok_embeddings is not None and held[0][1].output is not None
        assert all(m.tok_embeddings is None and m.output is None for m in held[1])
    else:
        assert layers == {0: [["0"], ["2"]], 1: [["1"], ["3"]]}
        assert held[0][0].tok_embeddings is not None and held[1][1].output is not None
        assert held[0][1].output is None and held[1][0].tok_embeddings is None


# ------------------------------------------------------------------------- the stages compose to the model

def _initialised(module: InternLM) -> InternLM:
    init_parameters(module, torch.device("cpu"), SEED)
    return module.eval()


def _packed_batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 24), generator=gen)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)  # two samples per row
    return tokens, positions


@pytest.mark.parametrize("num_layers, num_stages", [(4, 2), (4, 4), (5, 3)])
def test_stages_initialised_separately_compose_to_the_full_model(num_layers, num_stages):
    """As the trainer: stages cut from the meta model, each initialised on its own; their forward
    passes, chained with the hidden states and position_ids, give exactly the full model's logits."""
    full = _initialised(_meta_model(num_layers=num_layers))
    stages = [_initialised(pipeline.build_stage_module(_meta_model(num_layers=num_layers), s, num_stages))
              for s in range(num_stages)]
    for stage in stages:  # layout-independent init: each parameter equals the full model's
        for name, param in stage.named_parameters():
            assert torch.equal(param, full.get_parameter(name)), name
    tokens, positions = _packed_batch(full.args.vocab_size)
    with torch.no_grad():
        want = full(tokens, position_ids=positions)
        h = tokens
        for sid, stage in enumerate(stages):
            h = stage(h, position_ids=positions)
            if sid < num_stages - 1:  # hidden states travel between stages
                assert h.shape == (*tokens.shape, full.args.hidden_size)
    assert h.shape == want.shape == (*tokens.shape, full.args.vocab_size)
    torch.testing.assert_close(h, want, rtol=0, atol=0)


def test_stage_gradients_are_the_full_models():
    """Backward through the chained stages gives every parameter the gradient it has in the full model."""
    full = _initialised(_meta_model())
    stages = [_initialised(pipeline.build_stage_module(_meta_model(), s, 2)) for s in range(2)]
    tokens, positions = _packed_batch(full.args.vocab_size)
    full(tokens, position_ids=positions).logsumexp(-1).sum().backward()
    stages[1](stages[0](tokens, position_ids=positions), position_ids=positions).logsumexp(-1).sum().backward()
    for stage in stages:
        for name, param in stage.named_parameters():
            torch.testing.assert_close(param.grad, full.get_parameter(name).grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_tied_embeddings_with_pipeline_parallelism_are_refused():
    """The first stage's embedding and the last stage's head would be separate matrices."""
    msg = str(pytest.raises(ConfigError, config_from_dict, tiny_config(model=dict(tie_word_embeddings=True),
                                                                          parallel=dict(pipeline=2))).value)
    assert "model.tie_word_embeddings=True is not supported with parallel.pipeline.size=2" in msg
    config_from_dict(tiny_config(model=dict(tie_word_embeddings=True)))  # fine without pipeline parallelism
