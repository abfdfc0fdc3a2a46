"""The stop file's contents (InternEvo's convention: it holds a step number), as the checkpoint manager
reads them; the runs that act on it are in tests/e2e/test_internevo_run.py."""

import pytest

from internlm.checkpoint.manager import STOP_NOW, read_stop_file


@pytest.mark.parametrize("text,request_", [
    ("0", None), ("0\n", None), (" 0 ", None),  # InternEvo writes 0 at start: nothing asked
    ("7", 7), ("7\n", 7), ("+7", 7),            # save and stop at step 7
    ("-5", -5),                                 # save at step 5 and train on
    ("", STOP_NOW), ("\n", STOP_NOW),           # `touch STOP`: stop at the end of this step
    ("stop", STOP_NOW), ("3.5", STOP_NOW),      # not a step: stop at the end of this step
])
def test_read_stop_file(tmp_path, text, request_):
    path = tmp_path / "STOP"
    path.write_text(text)
    assert read_stop_file(path) == request_


def test_no_stop_file_or_an_unreadable_one_asks_nothing(tmp_path):
    assert read_stop_file(tmp_path / "missing") is None
    assert read_stop_file(tmp_path) is None  # a directory: warned about, not a request
