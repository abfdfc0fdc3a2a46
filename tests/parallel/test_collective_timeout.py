"""A rank stuck outside a collective ends every rank with a message naming the rank and the operation."""
import textwrap

from tests import launcher

SCRIPT = textwrap.dedent("""
    import sys, time
    import torch, torch.distributed as dist
    from internlm.errors import phase, run_guarded
    from internlm.launch import launch

    def body():
        info = launch("torch", timeout_s=3)
        if info.rank == 1:
            time.sleep(8)  # never joins the first all-reduce in time
        with phase("step 1 optimizer (grad-norm all-reduce)"):
            dist.all_reduce(torch.ones(1))
            dist.all_reduce(torch.ones(1))

    sys.exit(run_guarded(body))
""")


def test_collective_timeout_names_rank_and_operation(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(SCRIPT)
    result = launcher.start_script(2, script, [], tmp_path / "run").wait(timeout=120)
    assert result.returncode not in (0, -9), result.tail()
    err = result.stderr
    assert "[rank 0] collective failed or timed out during step 1 optimizer (grad-norm all-reduce)" in err, err[-3000:]
    # our own line, not a Python traceback, from the rank that timed out (torchrun's agent may still
    # print its own summary of the failed child)
    assert 'hang.py", line' not in err and "internlm/errors.py" not in err
