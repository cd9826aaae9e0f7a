"""One run per run dir: a second run of a dir another process trains in is refused and writes nothing; the
lock goes with the run that held it (also in-process, also after a crash)."""

import errno
import fcntl
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from llmtrain.train import run_lock
from tests.helpers import FAST, REPO, cli_env, llmtrain_cmd, read_metrics, run_cli_in_process
from tests.integration.test_resume import tree_digest, wait_for_steps

ARGS = [*FAST, "train.checkpoint_interval=2"]


def lock_is_free(run_dir) -> bool:
    with open(run_dir / run_lock.LOCK_FILE) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@pytest.fixture
def held_elsewhere(tmp_path):
    """Another process holds the run dir's lock, as a training run does."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from llmtrain.train import run_lock; "
         f"run_lock.acquire({str(run_dir)!r}); print('held', flush=True); sys.stdin.read()"],
        env=cli_env(), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    yield run_dir, holder.pid
    holder.stdin.close()
    holder.wait(timeout=60)


def test_a_run_dir_another_process_holds_is_refused_in_one_line_writing_nothing(held_elsewhere):
    run_dir, pid = held_elsewhere
    run_cli_in_process(*ARGS, "train.steps=2", f"hydra.run.dir={run_dir.parent / 'other'}", check=True)
    (run_dir / "metrics.jsonl").write_text("")  # some state of the run that holds it
    before = tree_digest(run_dir)
    proc = run_cli_in_process(*ARGS, "train.steps=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"hydra.run.dir={run_dir}: another run is training there (PID {pid} on " in lines[0]
    assert "choose another hydra.run.dir" in lines[0]
    assert tree_digest(run_dir) == before  # no .hydra/, config.yaml, checkpoints or metrics of its own
    assert not (run_dir / ".hydra").exists()


def test_a_held_run_dir_is_refused_before_its_checkpoints_are_read(held_elsewhere):
    """The run that holds the dir may be pruning the checkpoint this one would hash: the lock speaks first."""
    run_dir, pid = held_elsewhere
    step = run_dir / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{")  # unreadable, as a half-pruned dir reads
    proc = run_cli_in_process(*ARGS, "train.steps=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and f"another run is training there (PID {pid} on " in proc.stderr, (
        proc.stderr
    )
    assert "fail verification" not in proc.stderr


def test_two_real_runs_of_one_dir_the_second_is_refused_the_first_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        llmtrain_cmd(*ARGS, "train.steps=100000", f"hydra.run.dir={run_dir}"),
        env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_steps(first, run_dir, 3)
        proc = run_cli_in_process(*ARGS, "train.steps=100000", f"hydra.run.dir={run_dir}")
        assert proc.returncode == 2, proc.stderr
        assert f"(PID {first.pid} on " in proc.stderr
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0 and "stopped by SIGTERM" in out, err
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one run's metrics, not two interleaved
    assert lock_is_free(run_dir)


def test_the_lock_ends_with_the_run_in_process_also_after_a_crash(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_cli_in_process(*ARGS, "train.steps=2", f"hydra.run.dir={run_dir}", check=True)
    assert lock_is_free(run_dir) and not run_lock._held
    run_cli_in_process(*ARGS, "train.steps=4", f"hydra.run.dir={run_dir}", check=True)  # resumes: not refused
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]

    def crash(*args, **kwargs):
        assert not lock_is_free(run_dir)  # held while training
        raise RuntimeError("boom")

    monkeypatch.setattr("llmtrain.train.loop.train", crash)
    proc = run_cli_in_process(*ARGS, "train.steps=6", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    assert lock_is_free(run_dir) and not run_lock._held


def test_a_sweep_point_holds_its_own_dir_while_it_trains(tmp_path, monkeypatch):
    from llmtrain.train import loop

    seen = []
    real_train = loop.train

    def train(cfg, run_dir, **kwargs):
        seen.append(lock_is_free(run_dir))
        return real_train(cfg, run_dir, **kwargs)

    monkeypatch.setattr(loop, "train", train)
    run_cli_in_process(
        "-m",
        *ARGS,
        "train.steps=1",
        "optim.lr=1e-3,2e-3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        check=True,
    )
    assert seen == [False, False] and not run_lock._held


def test_a_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    fake = SimpleNamespace(
        flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN
    )
    monkeypatch.setattr(run_lock, "fcntl", fake)  # only llmtrain's flock calls, not filelock's
    run_dir = tmp_path / "run"
    proc = run_cli_in_process(*ARGS, "train.steps=2", f"hydra.run.dir={run_dir}", check=True)
    assert f"warning: cannot lock {run_dir / run_lock.LOCK_FILE} (No locks available" in proc.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert not run_lock._held


def test_a_checkpoint_saved_between_planning_and_locking_is_planned_again(tmp_path, monkeypatch):
    """A run that ends while this one plans (hashing its checkpoints) may save one more: this run resumes
    that one, not the one it planned before it held the lock."""
    import shutil

    from llmtrain import cli
    from llmtrain.train import run_dir as run_dir_module
    from tests.helpers import compose_config

    run_dir = tmp_path / "run"
    run_cli_in_process(*ARGS, "train.steps=2", f"hydra.run.dir={run_dir}", check=True)
    real_plan, calls = run_dir_module.plan_run, []

    def plan_while_the_other_run_saves(*args):
        plan = real_plan(*args)
        if not calls:  # the other run's last save lands just after this plan
            root = run_dir / "checkpoints"
            shutil.copytree(root / "step_00000002", root / "step_00000004")
            (root / "latest").write_text("step_00000004\n")
        calls.append(plan.resume_dir.name)
        return plan

    monkeypatch.setattr(run_dir_module, "plan_run", plan_while_the_other_run_saves)
    cfg = compose_config(*ARGS, "engine=torch", "train.device=cpu", "train.steps=6")
    try:
        plan = cli._plan_and_lock(cfg, run_dir, "torch")
        assert calls == ["step_00000002", "step_00000004"]
        assert plan.resume_dir == run_dir / "checkpoints" / "step_00000004"
        assert not lock_is_free(run_dir)
    finally:
        run_lock.release_all()


def test_in_a_scheduler_job_the_rank_that_trains_takes_the_lock(held_elsewhere, tmp_path, monkeypatch):
    """In a job, the CLI that plans may be the allocation's shell, which only starts the ranks (srun): the
    lock is taken in cli.run, by rank 0 of the ranks, around train()."""
    from llmtrain import cli
    from llmtrain.train import loop

    monkeypatch.setattr(cli.launch, "placed_by", lambda: object())  # as inside a SLURM job's step
    seen, real_train = [], loop.train

    def train(cfg, run_dir, **kwargs):
        seen.append(lock_is_free(run_dir))
        return real_train(cfg, run_dir, **kwargs)

    monkeypatch.setattr(loop, "train", train)
    run_dir = tmp_path / "job-run"
    run_cli_in_process(*ARGS, "train.steps=1", f"hydra.run.dir={run_dir}", check=True)
    assert seen == [False] and lock_is_free(run_dir) and not run_lock._held
    held, pid = held_elsewhere
    proc = run_cli_in_process(*ARGS, "train.steps=1", f"hydra.run.dir={held}")
    assert proc.returncode == 2 and f"another run is training there (PID {pid} on " in proc.stderr
    assert seen == [False] and not (held / "checkpoints").exists()
