"""internlm.inference's sampling loop: stream_generate (one token at a time), generate (the same loop,
collected), the repetition penalty (checked against transformers) and the vocabulary limit."""
import pytest
import torch

from internlm.inference import apply_repetition_penalty, generate, stream_generate
from internlm.model.internlm import InternLM
from tests.helpers import tiny_model_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InternLM(tiny_model_args(num_layers=2)).eval()


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_matches_transformers(penalty):
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen) * 4  # positive and negative logits
    ids = torch.randint(0, 50, (3, 20), generator=gen)  # repeated ids too
    ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, ids, penalty), ref, rtol=0, atol=0)
    # one row, as the sampling loop calls it
    torch.testing.assert_close(apply_repetition_penalty(logits[0], ids[0], penalty), ref[0], rtol=0, atol=0)


def test_greedy_with_penalty_is_argmax_of_penalized_logits(model):
    prompt = [1, 5, 7, 9, 5]
    ours = generate(model, prompt, 6, greedy=True, repetition_penalty=1.5)
    ids = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = apply_repetition_penalty(model(ids[None])[0, -1], ids, 1.5)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)])
    assert ours == ids[len(prompt):].tolist()
    with pytest.raises(ValueError, match="positive"):
        generate(model, prompt, 2, repetition_penalty=0)


def test_stream_generate_yields_one_token_per_forward(model, monkeypatch):
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, *a, **k: calls.append(x.shape[1]) or forward(x, *a, **k))
    stream = stream_generate(model, [1, 5, 7], 5, greedy=True)
    first = next(stream)
    assert calls == [3]  # the first token comes out before the second forward pass
    rest = list(stream)
    assert calls == [3, 4, 5, 6, 7]
    assert [first, *rest] == generate(model, [1, 5, 7], 5, greedy=True)


def test_sampling_is_the_same_through_both_and_respects_stops_and_vocab_limit(model):
    kw = dict(temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.2)
    a = generate(model, [1, 2, 3], 12, generator=torch.Generator().manual_seed(4), **kw)
    b = list(stream_generate(model, [1, 2, 3], 12, generator=torch.Generator().manual_seed(4), **kw))
    assert a == b and len(a) == 12
    stop = a[5]
    k = a.index(stop)
    assert generate(model, [1, 2, 3], 12, generator=torch.Generator().manual_seed(4), eos_token_id=stop,
                    **kw) == a[:k + 1]
    limited = generate(model, [1, 100, 120], 30, generator=torch.Generator().manual_seed(5), temperature=2.0,
                       top_p=1.0, vocab_limit=10)
    assert max(limited) < 10 and len(limited) == 30
    greedy_all = generate(model, [1, 100, 120], 8, greedy=True)
    assert max(generate(model, [1, 100, 120], 8, greedy=True, vocab_limit=10)) < 10 <= max(greedy_all)
