"""Launcher environment handling: torchrun, slurm, plain python."""
import os

import pytest

from internlm.launch import LaunchError, first_slurm_host, read_env


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: exercise our own node-list parser
    return monkeypatch


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"),
    ("node[003-005,9]", "node003"),
    ("gpu[12,14],cpu1", "gpu12"),
    ("a-b-[7-8]-x", "a-b-7-x"),
    ("host1,host2", "host1"),
])
def test_first_slurm_host(clean_env, nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_env(clean_env):
    clean_env.setenv("SLURM_PROCID", "13")
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_LOCALID", "5")
    clean_env.setenv("SLURM_JOB_NODELIST", "sh-[101-102]")
    assert read_env("slurm", port=29555) == (13, 16, 5)
    assert os.environ["MASTER_ADDR"] == "sh-101"
    assert os.environ["MASTER_PORT"] == "29555"


def test_slurm_without_srun_is_a_clear_error(clean_env):
    with pytest.raises(LaunchError, match="SLURM_PROCID.*srun"):
        read_env("slurm")


def test_torchrun_env(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "1234")
    assert read_env("torch") == (3, 4, 1)
    assert os.environ["MASTER_PORT"] == "1234"


def test_plain_python_is_a_world_of_one(clean_env):
    assert read_env("torch") == (0, 1, 0)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert int(os.environ["MASTER_PORT"]) > 0


def test_unknown_launcher(clean_env):
    with pytest.raises(LaunchError, match="unknown --launcher"):
        read_env("mpi")
