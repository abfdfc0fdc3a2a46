"""The command-line tools: each module has a `main(argv=None) -> int` (console entry points in
pyproject.toml; `tools/*.py` and `train.py` call the same functions)."""
