"""A run destroys the process group it created (NCCL warns `destroy_process_group() was not called`
otherwise), whether it succeeds or fails, and leaves a caller's group alone; third-party warnings of a run
go to its train.log."""

import socket
import subprocess
import sys
import warnings

import pytest
import torch

from llmtrain.dist import DistInfo, init_process_group
from llmtrain.errors import UserError
from llmtrain.process_exit import used_torch_distributed
from tests.helpers import FAST, REPO, cli_env, llmtrain_cmd
from tests.integration.test_resume import compose_cfg

# torchrun runs this instead of `-m llmtrain`: the same CLI, and at exit it says whether a group is left.
PROBE = """
import atexit, os
import torch.distributed as d
atexit.register(lambda: os.write(1, f"process group left at exit: {d.is_initialized()}\\n".encode()))
from llmtrain.cli import main
from llmtrain.process_exit import run_and_exit
run_and_exit(main)  # as `-m llmtrain` ends (a plain exit can abort in gloo's teardown: see below)
"""


@pytest.mark.slow
def test_two_process_run_destroys_its_process_group(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = llmtrain_cmd(*FAST, "train.steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *cmd[3:]]
    proc = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2" in proc.stdout
    assert proc.stdout.count("process group left at exit: False") == 2, proc.stdout
    assert "destroy_process_group() was not called" not in proc.stderr  # NCCL's words; gloo never warns


@pytest.mark.slow
def test_a_two_process_sweep_runs_every_point(tmp_path):
    """torchrun -m llmtrain -m ...: each point makes its own process group; the second one hung in the
    agent store's rendezvous under the first group's keys (before the group's own store prefix)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = llmtrain_cmd(
        "-m", *FAST, "train.steps=2", "train.seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *cmd[3:]]
    proc = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") == 2, proc.stdout  # rank 0 of each point


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rendezvous(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _failing_engine_build(cfg, dist):
    """As an engine whose build fails after it created the group and a library warned."""
    init_process_group(DistInfo(), "gloo", single_process=True)
    megatron = type(warnings)("megatron.core.fake")
    exec(
        compile("import warnings\nwarnings.warn('GPTModel is deprecated')\n", "/site/fake.py", "exec"),
        vars(megatron),
    )
    raise UserError("engine build failed")


def test_failed_run_destroys_the_group_it_created_and_logs_library_warnings(
    tmp_path, rendezvous, monkeypatch, capsys
):
    from llmtrain.train import loop

    monkeypatch.setattr(loop, "build_engine", _failing_engine_build)
    with pytest.raises(UserError, match="engine build failed"):
        loop.train(compose_cfg("train.steps=2"), tmp_path)
    assert not torch.distributed.is_initialized()
    assert "UserWarning: GPTModel is deprecated" in (tmp_path / "train.log").read_text()
    err = capsys.readouterr().err
    assert (
        f"warning (megatron.core.fake): GPTModel is deprecated (details in {tmp_path / 'train.log'})" in err
    )


def test_a_callers_process_group_is_left_alone(tmp_path, rendezvous, monkeypatch):
    from llmtrain.train import loop

    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    monkeypatch.setattr(loop, "build_engine", _failing_engine_build)  # finds the group there: not its own
    with pytest.raises(UserError):
        loop.train(compose_cfg("train.steps=2"), tmp_path)
    assert torch.distributed.is_initialized()


def test_one_process_group_needs_no_port(monkeypatch):
    """A single-process group (Megatron needs one) uses an in-memory store: a MASTER_PORT inherited from a
    parent that holds that port (on the GPU host: a test process's own group, then a CLI run as a child)
    must not fail the run with EADDRINUSE."""
    import llmtrain.dist as dist_mod

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        init_process_group(DistInfo(), "gloo", single_process=True)
        try:
            assert torch.distributed.get_world_size() == 1
        finally:
            dist_mod.close_process_group()


def test_a_failed_engine_build_gives_the_signal_handlers_back(tmp_path, rendezvous, monkeypatch):
    """A library caller's Ctrl-C must work again after train() failed early (it was left to the stop
    request's handler, which only sets a flag, when the engine build raised)."""
    import signal

    from llmtrain.train import loop
    from llmtrain.train.signals import StopRequest

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(loop, "build_engine", _failing_engine_build)
    with pytest.raises(UserError, match="engine build failed"):
        loop.train(compose_cfg("train.steps=2"), tmp_path)
    after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert after == before
    assert not any(isinstance(getattr(h, "__self__", None), StopRequest) for h in after)


# Each rank: a group, collectives still in flight when main() returns, an atexit handler, a buffered line.
RANK_THAT_EXITS = """
import atexit, concurrent.futures, torch
from llmtrain.dist import dist_info_from_env, init_process_group
from llmtrain.process_exit import run_and_exit

POOL = concurrent.futures.ThreadPoolExecutor(1)  # as a library's, never shut down: must not hang the exit

def main():
    init_process_group(dist_info_from_env(), "gloo")
    atexit.register(lambda: print("atexit handler ran"))
    POOL.submit(print, "pool task ran").result()
    works = [torch.distributed.all_reduce(torch.ones(1024), async_op=True) for _ in range(300)]
    del works
    print("buffered line")  # stdout is a pipe here: block-buffered until the process ends
    return 3

run_and_exit(main)
"""


@pytest.mark.slow
def test_a_distributed_rank_ends_with_its_own_status_not_an_abort_at_finalization(tmp_path):
    """Gloo's worker threads drop finished collectives during the interpreter's finalization and abort the
    process (exit 134, pytorch#190489; a cancelled SLURM job's rank reported it in CI). Ended through
    run_and_exit, each rank exits with main()'s status and loses neither its atexit handlers nor its
    buffered output. With a plain `sys.exit(main())` this script aborted in 10 of 10 runs (2026-12-07)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_THAT_EXITS)
    env = cli_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for rank in ranks:
        out, _ = rank.communicate(timeout=120)
        assert rank.returncode == 3, out[-2000:]
        expected = ("buffered line", "pool task ran", "atexit handler ran")
        assert all(line in out for line in expected), out[-2000:]


def test_a_group_made_by_llmtrain_counts_as_torch_distributed_used(rendezvous):
    init_process_group(DistInfo(), "gloo", single_process=True)
    assert used_torch_distributed()
