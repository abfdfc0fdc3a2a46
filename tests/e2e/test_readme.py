"""Every command of the README, run in order as a new user would, on a tiny budget: only step counts and
sizes are overridden (the demo trains STEPS steps on a small corpus, so `runs/demo/ckpt/300` becomes
`runs/demo/ckpt/{STEPS}`). The GPU and slurm lines are checked as far as their config and layout
(`train.py --dry-run`); the chat page (`streamlit run tools/web_demo.py -- ...`) is run once with its
options by streamlit's AppTest, which needs no browser or server (tests/e2e/test_web_demo_browser.py
drives one); the set-up and test lines are what CI itself runs. A README line this test does not know
fails it: the README cannot drift from the code."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from tests.helpers import ROOT, run_python

STEPS = 12
DEMO_CKPT = "runs/demo/ckpt/300"


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, `a && b` split, comments dropped, in order."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            if line and not line.startswith("#"):
                out.extend(part.strip() for part in line.split("&&"))
    return out


# The chat page, its options from INTERNLM_WEB_DEMO_ARGS, run once and sent one message.
PAGE_CHECK = """import os, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(os.path.abspath(sys.argv[1]), default_timeout=300).run()
at.chat_input[0].set_value("def parse(").run()
assert not at.exception, at.exception
print("\\n".join(["error: " + e.value for e in at.error] + [m.value for m in at.sidebar.markdown]))
print("replies:", len([m for m in at.chat_message if m.name == "assistant"]))
"""


def _python(args: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = run_python(args, cwd=cwd, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(args)} failed ({proc.returncode}):\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    return out


def test_the_readme_runs_as_written(tmp_path):
    for name in ("configs", "tools", "train.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    commands = readme_commands()
    assert any(c.startswith("python tools/demo.py") for c in commands)
    ckpt = f"runs/demo/ckpt/{STEPS}"
    done = []
    for command in commands:
        argv = shlex.split(command.replace(DEMO_CKPT, ckpt))
        program = argv[0]
        if program in ("pip", "{", "command", "apt-get") or command.startswith(("ruff check", "python -m pytest")):
            continue  # the set-up and the test command: what CI runs around this test
        if argv[:2] == ["python", "tools/demo.py"] and "--sft" in argv:  # same corpus: --max_mb as above
            out = _python(argv[1:] + ["--max_mb", "0.4", "--eval", "3", "data.total_steps=4",
                                      "lr_scheduler.total_steps=4"], tmp_path)
            assert f"[demo-sft] the demo's checkpoint: {ckpt} (step {STEPS})" in out
            assert "[demo-sft] exact match on 3 held-out prompts" in out
        elif argv[:2] == ["python", "tools/demo.py"]:
            out = _python(argv[1:] + ["--max_mb", "0.4", f"data.total_steps={STEPS}"], tmp_path)
            assert f"[demo] checkpoint: {ckpt} (step {STEPS}, with its tokenizer)" in out
            assert f"python tools/ckpt_info.py {ckpt}" in out  # it prints the tour's next commands
            (tmp_path / "runs" / "demo" / "curves.png").unlink()  # plot_metrics below must write it again
        elif argv[:2] == ["python", "tools/ckpt_info.py"]:
            assert f"step: {STEPS}" in _python(argv[1:], tmp_path)
        elif argv[:2] == ["python", "tools/generate.py"]:
            _python(argv[1:] + ["--max_new_tokens", "8"], tmp_path)  # no --tokenizer: the checkpoint has one
        elif argv[:3] == ["streamlit", "run", "tools/web_demo.py"]:
            page_args = shlex.join(argv[argv.index("--") + 1:])
            out = _python(["-c", PAGE_CHECK, argv[2]], tmp_path, env={"INTERNLM_WEB_DEMO_ARGS": page_args})
            assert "error:" not in out and f"step: `{STEPS}`" in out and "replies: 1" in out, out[-3000:]
        elif argv[:2] == ["python", "tools/convert2hf.py"]:
            _python(argv[1:], tmp_path)
            assert (tmp_path / "hf_demo" / "config.json").is_file()
            assert (tmp_path / "hf_demo" / "tokenizer.model").is_file()
        elif argv[:2] == ["python", "tools/plot_metrics.py"]:
            _python(argv[1:], tmp_path)
            assert (tmp_path / "runs" / "demo" / "curves.png").stat().st_size > 10_000
        elif argv[:2] == ["python", "train.py"] and "--config-keys" in argv:
            assert "model.hidden_size" in _python(argv[1:], tmp_path)
        elif argv[:2] == ["python", "train.py"]:
            steps = [a for a in argv if a.startswith("data.total_steps=")]
            args = [a for a in argv[1:] if a not in steps] + [f"data.total_steps={STEPS + 3}"]
            out = _python(args, tmp_path)
            if steps:  # the line that continues the demo's run
                assert f"resumed from {ckpt}" in out and f"step={STEPS + 3}/{STEPS + 3}" in out
        elif argv[:2] == ["python", "tools/tokenizer.py"]:
            (tmp_path / "raw.jsonl").write_text('{"text": "def parse(line):\\n    return line.split()"}\n' * 5)
            shutil.copy(tmp_path / "demo_data" / "tokenizer" / "tokenizer.model", tmp_path / "tok.model")
            _python(argv[1:], tmp_path)
            assert (tmp_path / "data" / "en" / "train.bin.meta").is_file()
        elif argv[:2] == ["python", "tools/benchmark.py"]:
            tiny = ["--steps", "1", "--warmup", "0", "--peak-seconds", "0.1", "model.num_layers=1",
                    "data.micro_num=1", "data.micro_bsz=1"]
            assert "| config |" in _python(argv[1:] + tiny, tmp_path)
        elif argv[:2] == ["python", "tools/plan.py"]:
            out = _python(argv[1:], tmp_path)
            assert "memory per rank" in out and "predicted: TGS" in out
        elif program in ("torchrun", "srun"):
            world, rest = _launcher_world(argv)
            assert rest[0] in ("train.py", "python") , command
            args = rest[rest.index("train.py"):] + ["--dry-run", "--world-size", str(world),
                                                     "data.train_folder=None", "data.valid_folder=None"]
            assert "config OK" in _python(args, tmp_path)
        elif program == "tensorboard":
            assert list((tmp_path / "runs").glob("*/tensorboard/events.out.tfevents.*"))
        else:
            raise AssertionError(f"README command not covered by this test: {command}")
        done.append(program if program != "python" else argv[1])
    assert {"tools/demo.py", "tools/convert2hf.py", "tools/generate.py", "train.py", "torchrun"} <= set(done)


def _launcher_world(argv: list[str]) -> tuple[int, list[str]]:
    """(number of processes, the command after the launcher's own options) of a torchrun/srun line."""
    nodes, per_node, i = 1, 1, 1
    while i < len(argv) and argv[i].startswith("-"):
        opt = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if opt in ("--nproc_per_node", "--nproc-per-node", "--ntasks-per-node"):
            per_node = int(value)
        elif opt in ("--nnodes", "-N"):
            nodes = int(value)
        i += 2
    return nodes * per_node, argv[i:]
