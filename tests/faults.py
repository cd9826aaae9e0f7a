"""Fault injection for the tests: training data that is non-finite at chosen steps, so the loop's NaN policy
(skip, count, diverge) can be exercised without a config key in the package.

In the test process:       monkeypatch.setattr(loop, "build_data", nan_at_steps({3}))
In a `python -m llmtrain` child:  python -m tests.faults --nan-steps=3,4 <llmtrain arguments>
                                  (run_cli_with_nan({3, 4}, *args) runs that as tests.helpers.run_cli does)
"""

import os
import runpy
import subprocess
import sys


def _poisoned(batches: list[dict]) -> list[dict]:
    return [{**mb, "loss_mask": mb["loss_mask"] * float("nan")} for mb in batches]


def nan_at_steps(steps):
    """A build_data for the loop whose data gives a NaN loss mask to every micro-batch of the 1-based steps
    `steps` (the global batch that starts at sample (step - 1) x global_batch_size; the sqrt(3) probe, which
    reads the next step's batch, sees it poisoned too)."""
    from llmtrain.train import loop

    steps, real = set(steps), loop.build_data

    def build(*args, **kwargs):
        data = real(*args, **kwargs)
        clean = data.batch_at

        def batch_at(first_sample: int):
            batches = clean(first_sample)
            return _poisoned(batches) if first_sample // data.global_batch_size + 1 in steps else batches

        data.batch_at = batch_at
        return data

    return build


def run_cli_with_nan(
    steps, *args: str, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess:
    """tests.helpers.run_cli, with the 1-based `steps` poisoned in the child."""
    from tests.helpers import REPO, cli_env

    cmd = [sys.executable, "-m", "tests.faults", "--nan-steps=" + ",".join(map(str, steps)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def main() -> None:
    """`python -m llmtrain` with --nan-steps=S1,S2,... (the first argument) poisoning those steps."""
    flag, *rest = sys.argv[1:]
    if not flag.startswith("--nan-steps="):
        raise SystemExit("usage: python -m tests.faults --nan-steps=S1,S2,... <llmtrain arguments>")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as llmtrain/__main__.py does, before torch loads
    from llmtrain.train import loop

    loop.build_data = nan_at_steps(int(s) for s in flag.split("=", 1)[1].split(","))
    sys.argv = [sys.argv[0], *rest]
    runpy.run_module("llmtrain", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
