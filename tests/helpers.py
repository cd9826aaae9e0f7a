"""Shared helpers for CLI-level tests: run `python -m llmtrain` with a very small model, in this process
(`run_cli_in_process`, no start-up cost) or in a subprocess (`run_cli`, for what needs a process of its own:
signals, SIGKILL, torchrun, a changed environment)."""

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A ~70k-parameter model and tiny batches: each step takes milliseconds on 2 cores.
FAST = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=172",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=64",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "optim.warmup_steps=2",
    "logging.wandb.mode=disabled",
    "logging.console=plain",
]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # deterministic and friendly to parallel test runs
    env.pop("WORLD_SIZE", None)
    env.pop("SLURM_JOB_ID", None)
    return env


def llmtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmtrain", *args]


def run_cli(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        llmtrain_cmd(*args), capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Python's own display (pytest records warnings instead): the text a subprocess prints to stderr."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _added_by_pytest(f) -> bool:
    """pytest shows every DeprecationWarning during a test; a plain `python -m llmtrain` ignores them."""
    action, message, category, module, _ = f
    return (
        action == "always"
        and category in (DeprecationWarning, PendingDeprecationWarning)
        and not (message or module)
    )


@contextlib.contextmanager
def _as_a_fresh_process():
    """What `run_cli`'s subprocess starts with and what its exit throws away: cwd, argv, environment
    (cli_env's), torch threads (OMP_NUM_THREADS), Python's default warning filters and display, signal
    handlers, root logging handlers, Hydra's global state and the CLI's run plan. Restored afterwards, so a
    test that calls the CLI in-process leaves nothing behind for the next one."""
    import torch
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain import cli
    from llmtrain.train import signals

    cwd, argv, environ = os.getcwd(), sys.argv[:], dict(os.environ)
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in signals.StopRequest.SIGNALS}
    stop_was_installed = signals._PROCESS.installed
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    env = cli_env()
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(REPO)
    GlobalHydra.instance().clear()
    cli._PLAN = None
    try:
        with warnings.catch_warnings():
            kept = [f for f in warnings.filters if not _added_by_pytest(f)]
            warnings.resetwarnings()  # also forgets which warnings were shown: each call is a fresh start
            warnings.filters.extend(kept)
            warnings.showwarning = _show_warning
            yield
    finally:
        if not stop_was_installed and signals._PROCESS.installed:
            signals._PROCESS.uninstall()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for handler in root.handlers:
            if handler not in root_handlers:
                handler.close()  # Hydra's job logging: the run dir's log file, a stream to our buffer
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        GlobalHydra.instance().clear()
        cli._PLAN = None
        torch.set_num_threads(threads)
        os.chdir(cwd)
        sys.argv[:] = argv
        os.environ.clear()
        os.environ.update(environ)


class _TimedOut(BaseException):
    """Raised by SIGALRM in the CLI's code; a BaseException, so no `except Exception` there swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """run_cli's `timeout`: a hung run fails its test instead of hanging the whole session."""

    def expire(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli_in_process(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`run_cli` without the subprocess: `llmtrain.cli.main()` with sys.argv set, stdout/stderr captured,
    SystemExit as the return code and an uncaught exception as Python would report it (traceback, code 1)."""
    from llmtrain import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _as_a_fresh_process(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv[:] = [str(REPO / "llmtrain" / "__main__.py"), *args]
        try:
            with _time_limit(timeout):
                cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except _TimedOut:
            code = None
        except Exception:
            traceback.print_exc()
            code = 1
    proc = subprocess.CompletedProcess(["llmtrain", *args], code, out.getvalue(), err.getvalue())
    if code is None:
        raise AssertionError(f"timed out after {timeout} s\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def save_tiny_hf_model(tmp_path, config_cls, model_cls, *, tied, name="hf", dtype=None, **config):
    """A tiny random HF causal LM (vocab 128, hidden 64, 2 layers, 4 heads / 2 KV groups), its norm weights
    made non-trivial so a mix-up of norms would show, saved sharded (several safetensors + an index).
    `config` adds or overrides config fields (e.g. rope_theta, head_dim). Returns (model, path)."""
    import torch

    torch.manual_seed(0)
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied)  # fmt: skip
    model = model_cls(config_cls(**{**fields, **config})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    path = tmp_path / name
    model.save_pretrained(str(path), max_shard_size="60KB")
    return model, path


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(tokens).logits.float()


def compose_config(*overrides: str):
    """The config `python -m llmtrain <overrides>` composes, built in-process with Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.cli import CONFIG_DIR
    from llmtrain.config.resolvers import register_resolvers
    from llmtrain.config.schema import register_configs

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def small_llama_spec():
    """The 2-layer Llama the checkpoint and convert-io tests save and load."""
    from llmtrain.models.spec import ModelSpec

    return ModelSpec(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        seq_length=16,
        rope_theta=10000.0,
    )


def schema_config(cache_dir, **over):
    """The schema's defaults (no Hydra), data.cache_dir set and dotted `over` applied: for data-build tests."""
    from omegaconf import OmegaConf

    from llmtrain.config.schema import Config

    cfg = OmegaConf.structured(Config)
    cfg.data.cache_dir = str(cache_dir)
    for key, value in over.items():
        OmegaConf.update(cfg, key, value)
    return cfg
