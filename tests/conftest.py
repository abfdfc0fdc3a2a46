"""The fixtures every test folder shares: the sentencepiece tokenizer, the session's train.py runner
(which starts every selected parity run up front, cached, so each single-process reference runs once
per session) and the parity table printed at the end of the session.

Plain helpers are in tests/helpers.py (tiny config, subprocess environment, metrics.jsonl) and
tests/launcher.py (train.py / torchrun runs, parity comparison).
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

from tests import launcher
from tests.helpers import ROOT, run_python

# ---------------------------------------------------------------------------------------------------
# tokenizer

# Text the tokenizer tests encode must also appear, in kind, in its training data: code with
# indentation, prose, CJK text (emoji and rare characters go through byte fallback).
_EXTRA_TRAINING_TEXT = ["The quick brown fox jumps over the lazy dog. " * 5, "中文 文本 测试 " * 10]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A small sentencepiece BPE tokenizer (vocabulary 600, the trainer settings of
    tools/train_tokenizer.py: byte fallback, whitespace kept, unk=0 bos=1 eos=2), trained through
    that command line on a few standard-library modules and some prose; the path of its .model."""
    tmp = tmp_path_factory.mktemp("spm")
    src = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py"):
            f.write(json.dumps({"text": (src / name).read_text(encoding="utf-8")}) + "\n")
        for text in _EXTRA_TRAINING_TEXT:
            f.write(json.dumps({"text": text}) + "\n")
    proc = run_python([ROOT / "tools" / "train_tokenizer.py", "--input", corpus, "--model_prefix", tmp / "tok",
                       "--vocab_size", "600"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp / 'tok.model'}" in proc.stdout
    return tmp / "tok.model"


# ---------------------------------------------------------------------------------------------------
# multi-process runs

@pytest.fixture(scope="session")
def runner(request, tmp_path_factory):
    """A launcher.Runner already working through the runs of every selected test: a test's parameter
    that has a `jobs()` method names the runs it needs (its reference first). Runs with more
    processes start first so that the longest one does not come last.
    PARALLEL_TEST_JOBS sets how many runs go side by side (default 2)."""
    r = launcher.Runner(tmp_path_factory, int(os.environ.get("PARALLEL_TEST_JOBS", "2")))
    wanted: list[launcher.Job] = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        for value in (spec.params.values() if spec else ()):
            if hasattr(value, "jobs"):
                wanted += [j for j in value.jobs() if j not in wanted]
    references = [j for j in wanted if j.nproc == 1]
    others = sorted((j for j in wanted if j.nproc > 1), key=lambda j: -j.nproc)
    for job in references + others:
        r.submit(job)
    yield r
    r.close()


_PARITY_ROWS: list[tuple[str, ...]] = []


@pytest.fixture(scope="session")
def parity_log():
    """parity_log(name, nproc, parity, tolerance, outcome): one row of the summary table."""

    def log(name: str, nproc: int, parity: launcher.Parity, tolerance: float, outcome: str):
        _PARITY_ROWS.append((name, str(nproc), f"{parity.loss:.1e}", f"{parity.grad_norm:.1e}",
                             f"{tolerance:.0e}", outcome))

    return log


def pytest_terminal_summary(terminalreporter):
    if not _PARITY_ROWS:
        return
    tr = terminalreporter
    tr.section("parallel parity: max relative difference vs. one process")
    header = ("layout", "procs", "loss", "grad_norm", "tol", "")
    widths = [max(len(r[i]) for r in [header, *_PARITY_ROWS]) for i in range(len(header))]
    for row in [header, *_PARITY_ROWS]:
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process tiny models run fastest on one thread; two spin against the runs a session starts
    beside them (50x slower seen). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
