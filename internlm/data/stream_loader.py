"""Step batches packed from a streaming corpus, prepared in the background, resumable at any step.

The stream of samples (``internlm.data.streaming``) is one global sequence, the same on every rank:
its tokens are laid end to end and cut into rows of ``packed_length``, exactly as ``PackedDataset``
cuts a ``.bin`` folder (a sample split between two rows is two pieces; masks, positions and labels as
there). A global step takes the next ``dp_size * micro_num * micro_bsz`` rows, as micro-batches of
``micro_bsz`` consecutive rows, and dp rank ``r`` takes micro-batches ``[r * micro_num, (r + 1) *
micro_num)`` (the sampler's rule, unshuffled). So every rank reads and tokenizes the whole stream
(cheap next to a training step) and no rank needs another's.

The position after a step is part of the batch, so prefetching does not move it: ``state_dict()`` is
the position after the last step handed to the trainer, and a resumed run (under any dp size) sees
the very batches an uninterrupted run would.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from internlm.data.loader import _gather_micro_batches
from internlm.data.packed import PackedDataset
from internlm.data.streaming import Position, StreamingCorpus, samples_from
from internlm.data.tokenized import DataFormatError

__all__ = ["StreamingLoader", "MemorySource"]

PREFETCH = 4  # steps prepared ahead


class MemorySource:
    """Samples held in memory, as a PackedDataset source (lengths of the signed token arrays)."""

    def __init__(self, samples, type_names):
        self.samples = [(np.asarray(t, dtype=np.int64), int(k)) for t, k in samples]
        self.lengths = np.asarray([len(t) for t, _ in self.samples], dtype=np.int64)
        self.type_names = list(type_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


class _Packer:
    """Cuts the sample stream into global steps of ``rows`` rows; yields (rows as a PackedDataset, the
    position after the step)."""

    def __init__(self, samples, type_names, packed_length: int, rows: int, pack_sample_into_one: bool):
        self.samples = samples
        self.type_names = type_names
        self.packed_length = packed_length
        self.rows = rows
        self.pack_sample_into_one = pack_sample_into_one
        self.carry = None  # (tokens left of a sample, type, position of its first token)

    def next_step(self):
        need = self.rows * self.packed_length
        pieces, have = [], 0
        while have < need:
            if self.carry is not None:
                tokens, type_id, pos = self.carry
                self.carry = None
            else:
                s = next(self.samples)
                tokens, type_id, pos = s.tokens, s.type_id, Position(s.epoch, s.file, s.record, s.offset)
            take = min(len(tokens), need - have)
            pieces.append((tokens[:take], type_id))
            have += take
            after = Position(pos.epoch, pos.file, pos.record, pos.offset + take)
            if take < len(tokens):
                self.carry = (tokens[take:], type_id, after)
        # a piece of a split sample starts its own positions, as in PackedDataset's rows
        rows = PackedDataset(MemorySource(pieces, self.type_names), self.packed_length,
                             pack_sample_into_one=self.pack_sample_into_one)
        return rows, after


class StreamingLoader:
    """Infinite iterator of step batches for one dp rank, read from a streaming corpus (the
    TrainLoader interface: ``next``, ``state_dict``, ``load_state_dict``, ``tokens_per_step_global``)."""

    def __init__(self, corpus: StreamingCorpus, tokenizer_path: str, packed_length: int, micro_num: int,
                 micro_bsz: int, dp_rank: int, dp_size: int, min_length: int = 0,
                 pack_sample_into_one: bool = False, workers: int = 0):
        if min(micro_num, micro_bsz, dp_size) <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid micro_num={micro_num}, micro_bsz={micro_bsz}, dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        self.corpus = corpus
        self.tokenizer_path = str(tokenizer_path)
        self.type_names = corpus.type_names
        self.packed_length = int(packed_length)
        self.micro_num, self.micro_bsz = int(micro_num), int(micro_bsz)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.min_length = int(min_length)
        self.pack_sample_into_one = bool(pack_sample_into_one)
        self.workers = int(workers)
        self.global_rows_per_step = self.dp_size * self.micro_num * self.micro_bsz
        self.tokens_per_step_global = self.global_rows_per_step * self.packed_length
        self.steps_per_epoch = None  # unknown until the stream has been read once
        self.position = Position(0, 0, 0, 0)
        self._thread = None
        self._queue = None
        self._stop = threading.Event()
        self._pool = None

    # ---- the background producer ------------------------------------------------------------------
    def _start(self) -> None:
        from internlm.data.text import RecordEncoder

        encoder = RecordEncoder(self.tokenizer_path)
        if self.workers > 0 and self._pool is None:
            import multiprocessing

            from internlm.data.text import _init_worker

            # spawned, not forked: the training process runs threads (gloo, torch) a fork would copy mid-use
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, _init_worker, (self.tokenizer_path, True, True))
        samples = samples_from(self.corpus, encoder, self.position, self.min_length, self._pool)
        packer = _Packer(samples, self.type_names, self.packed_length, self.global_rows_per_step,
                         self.pack_sample_into_one)
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=PREFETCH)
        self._thread = threading.Thread(target=self._produce, args=(packer, self._queue, self._stop),
                                        name="streaming-data", daemon=True)
        self._thread.start()

    def _produce(self, packer: _Packer, out: queue.Queue, stop: threading.Event) -> None:
        mine = range(self.dp_rank * self.micro_num, (self.dp_rank + 1) * self.micro_num)
        try:
            while not stop.is_set():
                rows, after = packer.next_step()
                micro = [list(range(m * self.micro_bsz, (m + 1) * self.micro_bsz)) for m in mine]
                item = (_gather_micro_batches(rows, micro), after)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the trainer's thread, raised there
            out.put((exc, None))

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None

    def close(self) -> None:
        self._halt()
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- the TrainLoader interface ----------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        batch, after = self._queue.get()
        if after is None:
            self._halt()
            raise batch
        self.position = after
        return batch

    def next(self):
        return self.__next__()

    def state_dict(self) -> dict:
        return {"kind": "streaming", "epoch": self.position.epoch, "file": self.position.file,
                "record": self.position.record, "offset": self.position.offset,
                "files": self.corpus.names, "global_rows_per_step": self.global_rows_per_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "streaming":
            raise DataFormatError("the checkpoint's data position is a .bin sampler's (data.type='tokenized'); "
                                  "it cannot resume a streaming run: load the model only "
                                  "(load_ckpt_info content=('model',)) to switch data types")
        files = list(state["files"])
        if files != self.corpus.names:
            raise DataFormatError(f"cannot resume the streaming position: the checkpoint read the files {files[:4]}"
                                  f"{'...' if len(files) > 4 else ''} but {self.corpus.root} now holds "
                                  f"{self.corpus.names[:4]}{'...' if len(self.corpus.names) > 4 else ''}")
        self._halt()
        self.position = Position(int(state["epoch"]), int(state["file"]), int(state["record"]), int(state["offset"]))


def read_corpus(corpus: StreamingCorpus, tokenizer_path: str) -> MemorySource:
    """Every sample of a (small) streaming corpus, tokenized now: raw validation data."""
    from internlm.data.text import RecordEncoder

    encoder = RecordEncoder(tokenizer_path)
    samples = []
    for f in range(len(corpus.paths)):
        encoded = encoder.batch([(where, rec) for _, where, rec in corpus.records(f)])
        samples += [(ids, corpus.file_type_ids[f]) for ids in encoded]
    return MemorySource(samples, corpus.type_names)


def check_tokenizer(tokenizer_path: str, vocab_size: int) -> None:
    """A tokenizer whose ids the model's embedding cannot hold is a config error, said at start."""
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).get_piece_size()
    if size > vocab_size:
        raise DataFormatError(f"data.tokenizer_path={tokenizer_path!r} has {size} pieces but model.vocab_size is "
                              f"{vocab_size}: raise model.vocab_size to at least {size}")
