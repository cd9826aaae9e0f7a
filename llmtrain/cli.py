"""`python -m llmtrain [recipe=NAME] [key=value ...]`: Hydra entry point.

Every override set is composed and validated before Hydra starts the run(s), so a user error prints one
line (`error: key=value: problem (allowed: ...)`) and exits with code 2, never a traceback.
"""

import contextlib
import os
import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from llmtrain import launch
from llmtrain.config.resolvers import register_resolvers
from llmtrain.config.schema import register_configs
from llmtrain.errors import ConfigError, TrainingError, UserError
from llmtrain.overrides import (
    allowed_keys,
    check_override_syntax,
    describe_composition_error,
    sweep_points,
    user_overrides,
)
from llmtrain.recipe_files import CONFIG_DIR, resolve_recipes

MAX_VALIDATED_SWEEP_POINTS = 64


def planned_engine(cfg) -> str:
    from llmtrain.engines.select import megatron_available, resolve_engine_name

    if cfg.dry_run and cfg.engine.name == "auto":
        return "megatron"  # dry runs describe the production (GPU) path
    if launch.select(cfg).submits(cfg):  # the job runs elsewhere: this machine's engines do not matter
        return cfg.engine.name if cfg.engine.name != "auto" else "megatron"
    name = resolve_engine_name(cfg)
    if name == "megatron" and not cfg.dry_run and not megatron_available():
        raise ConfigError(
            "engine",
            "megatron",
            "needs CUDA, megatron-core and transformer-engine on this "
            "machine; install the gpu extra on a GPU host, use engine=torch, or add dry_run=true",
        )
    return name


def _unknown_key(node, schema, prefix: str = "") -> str | None:
    for key in node:
        full = f"{prefix}{key}"
        if key not in schema:
            return full
        child, schema_child = node[key], schema[key]
        nested = OmegaConf.is_dict(child) and OmegaConf.is_dict(schema_child)
        if nested and (found := _unknown_key(child, schema_child, full + ".")):
            return found
    return None


def check_against_schema(cfg) -> None:
    """`+key=value` can add keys Hydra does not know; the typed schema refuses them."""
    from llmtrain.config.schema import Config

    if full_key := _unknown_key(cfg, OmegaConf.structured(Config)):
        parent, _, leaf = full_key.rpartition(".")
        value = OmegaConf.select(cfg, full_key)
        raise ConfigError(full_key, value, f"unknown key '{leaf}'", allowed_keys(parent) or None)


def check_and_validate(cfg, *, inspect_only: bool = False) -> tuple[int, str]:
    from llmtrain.config.validate import validate

    check_against_schema(cfg)

    from llmtrain.fit import check_fits, check_fits_planned

    world, engine = launch.planned_world(cfg), planned_engine(cfg)
    validate(cfg, world=world, engine=engine)
    if not (cfg.dry_run or inspect_only):
        (check_fits_planned if launch.select(cfg).submits(cfg) else check_fits)(cfg, world, engine)
    return world, engine


INSPECT_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--resolve")


# ---- pre-flight: compose + validate every point of the command line -----------------------------------
def preflight(argv: list[str]) -> None:
    overrides = user_overrides(argv)
    inspect_only = any(a in INSPECT_FLAGS for a in argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    check_override_syntax(argv, multirun)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # a sweep: every job Hydra will run, the recipe's own sweep (hydra.sweeper.params) included
        points = sweep_points(overrides) if multirun else [overrides]
        if len(points) > MAX_VALIDATED_SWEEP_POINTS:
            # ~0.5 s a point (measured on 2 busy cores): a large sweep is checked in part now, every point again as it starts
            print(
                f"preflight: checked the first {MAX_VALIDATED_SWEEP_POINTS} of {len(points)} sweep points; "
                "each of the others is checked when it starts",
                file=sys.stderr,
                flush=True,
            )
            points = points[:MAX_VALIDATED_SWEEP_POINTS]
        for num, point in enumerate(points):
            try:
                try:
                    cfg = compose(config_name="train", overrides=point)
                    OmegaConf.to_container(cfg, resolve=True)  # surfaces bad interpolations now
                except UserError:
                    raise
                except Exception as e:
                    raise UserError(describe_composition_error(e, point)) from None
                check_and_validate(cfg, inspect_only=inspect_only)
            except UserError as e:
                if len(points) > 1:  # which job of the sweep, as Hydra numbers its dirs
                    e.args = (f"sweep point {num} ({' '.join(point)}): {e}", *e.args[1:])
                raise
    GlobalHydra.instance().clear()


# ---- the run dir, decided before Hydra writes into it -----------------------------------------------
_PLAN = None  # the RunPlan made before Hydra started (single runs); run() uses it


def _hydra_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan_before_hydra(argv: list[str]) -> list[str]:
    """Validate the run dir and the resume point of a single run before Hydra writes `.hydra/` into it.

    Returns overrides to add (`hydra.run.dir=<dir>-restartN` for train.resume=never beside an existing run).
    """
    global _PLAN
    if any(a in INSPECT_FLAGS for a in argv):
        return []
    if any(a in ("-m", "--multirun") for a in argv):
        # each point is planned in run(), after Hydra made its dir
        dry = any(re.fullmatch(r"dry_run=(true|True|measure)", a) for a in argv)
        return ["hydra.output_subdir=null"] if dry else []  # a dry-run sweep writes no point's .hydra/
    from llmtrain.train.run_dir import plan_run

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            full = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            given = str(full.hydra.run.dir)
        except Exception as e:
            raise UserError(describe_composition_error(e, overrides)) from None
    GlobalHydra.instance().clear()
    if not given.strip():  # Hydra would run in the current directory (the repo root, often)
        raise UserError(
            "hydra.run.dir is empty (an unset shell variable?); give a directory, e.g. hydra.run.dir=runs/mine, "
            "or leave it out for runs/<date>/<time>"
        )
    hydra_dir = Path(os.path.abspath(given))  # as Hydra makes runtime.output_dir
    run_dir = Path(os.path.abspath(os.path.expanduser(given)))  # '~/x' quoted: Hydra would make ./~/x
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    extra = []
    if cfg.dry_run:  # no .hydra/ (an existing run's stays as it is); a new dir goes again after the report
        extra.append("hydra.output_subdir=null")
        if not run_dir.exists():
            top = run_dir
            while not top.parent.exists():
                top = top.parent
            _DRY_RUN_MADE[run_dir] = top  # the outermost dir Hydra will create for it
    elif not launch.select(cfg).submits(cfg):
        engine, rank0 = planned_engine(cfg), _is_rank0()
        # Outside a scheduler's job this process trains (or is torchrun's rank): rank 0 locks the run dir
        # before Hydra writes .hydra/ there, until main() ends. In a job, an allocation's shell only starts
        # the ranks (srun), so the lock waits for run(), in the rank that trains.
        if launch.placed_by() is None and rank0:
            _PLAN = _plan_and_lock(cfg, run_dir, engine)
        else:
            _PLAN = plan_run(cfg, run_dir, engine)
        if not rank0:  # the other ranks write no .hydra/ (rank 0's record; a refused run's none)
            extra.append("hydra.output_subdir=null")
        run_dir = _PLAN.run_dir
    if run_dir != hydra_dir:
        extra.append(f"hydra.run.dir={_hydra_quote(str(run_dir))}")
    return extra


_DRY_RUN_MADE: dict[Path, Path] = {}  # run dir -> the outermost dir this dry run's Hydra created for it


def _drop_if_only_an_empty_log(run_dir: Path) -> None:
    """A dry run leaves no run dir: Hydra made it (and its missing parents) for its empty log file; anything
    else in them stays."""
    top = _DRY_RUN_MADE.pop(run_dir, None)
    log = run_dir / "train.log"
    if top is None or [p.name for p in run_dir.iterdir()] != ["train.log"] or log.stat().st_size:
        return
    log.unlink()
    d = run_dir
    while True:
        d.rmdir()
        if d == top or any(d.parent.iterdir()):
            break
        d = d.parent


def _is_rank0() -> bool:
    from llmtrain.dist import dist_info_from_env

    return dist_info_from_env().is_main


def _plan_and_lock(cfg, run_dir: Path, engine: str, tries: int = 3):
    """plan_run, then hold the planned dir's lock (train/run_lock.py). Planned again where that dir's
    checkpoints changed in between (a run that held it ended meanwhile): the plan describes what this run
    finds, once nobody else can change it."""
    from llmtrain.train import run_lock
    from llmtrain.train.run_dir import plan_run, training_state_stamp

    for _ in range(tries):
        run_lock.refuse_if_held(run_dir)
        before = training_state_stamp(run_dir)
        try:
            plan = plan_run(cfg, run_dir, engine)
        except UserError:  # e.g. a checkpoint pruned while it was hashed: the run that holds the dir says why
            run_lock.refuse_if_held(run_dir)
            raise
        if plan.run_dir != run_dir:  # train.resume=never's fresh dir: chosen by quick checks just now
            before = training_state_stamp(plan.run_dir)
        acquired = run_lock.acquire(plan.run_dir)
        if training_state_stamp(plan.run_dir) == before:
            return plan
        if acquired:
            run_lock.release(plan.run_dir)
    raise UserError(
        f"hydra.run.dir={run_dir}: its checkpoints changed while this run was planning, {tries} times; "
        "another process is writing there: stop it, or choose another hydra.run.dir"
    )


# ---- the run -------------------------------------------------------------------------------------------
def run(cfg) -> None:
    world, engine = check_and_validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if launch.select(cfg).dispatch(cfg, world, engine):  # e.g. cluster=slurm: submit, plan, srun in salloc
        if cfg.dry_run:
            _drop_if_only_an_empty_log(run_dir)
        return
    if cfg.dry_run:
        from llmtrain.dryrun import dry_run_report

        print(dry_run_report(cfg, world, engine))
        _drop_if_only_an_empty_log(run_dir)
        return
    # Only a run that trains imports torch and the training code.
    from llmtrain.dist import dist_info_from_env
    from llmtrain.train import run_lock
    from llmtrain.train.loop import train
    from llmtrain.train.run_dir import CONFIG_HEADER, claim, plan_run

    plan = _PLAN if _PLAN is not None and _PLAN.run_dir == run_dir else plan_run(cfg, run_dir, engine)
    run_dir = plan.run_dir
    dist = dist_info_from_env()
    # rank 0 holds the run dir's lock until train() returns (already since plan_before_hydra outside a job)
    with run_lock.holding(run_dir) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            if plan.note:
                print(plan.note, flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            claim(run_dir)

        def write_config() -> None:  # once the engine and data are built: a refused run leaves the run's
            (run_dir / "config.yaml").write_text(CONFIG_HEADER + OmegaConf.to_yaml(cfg, resolve=True))

        summary = train(
            cfg,
            run_dir,
            after_preemption=launch.after_preemption,
            resume_dir=plan.resume_dir,
            on_ready=write_config if dist.is_main else None,
        )
    if dist.is_main:
        loss = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
        how = f"stopped by {summary.stopped_by} at" if summary.stopped_by else "done:"
        print(
            f"{how} step {summary.steps_done}, loss {loss} | metrics {run_dir / 'metrics.jsonl'} | "
            f"checkpoint {summary.checkpoint or 'none written'} | config {run_dir / 'config.yaml'}",
            flush=True,
        )
    if summary.stopped_by and HydraConfig.get().mode == RunMode.MULTIRUN:
        # A stop signal ends the sweep, not just this point (Hydra would start the next one). Rerunning the
        # same command with hydra.sweep.dir=<this sweep's dir> resumes every point from its checkpoint.
        if dist.is_main:
            print(f"sweep stopped by {summary.stopped_by}: the remaining points were not started", flush=True)
        raise SystemExit(0)


_DIVERGED_POINTS: list[str] = []  # sweep points that stopped on a TrainingError (the sweep went on)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg) -> None:
    try:
        run(cfg)
    except UserError as e:
        if isinstance(e, TrainingError) and HydraConfig.get().mode == RunMode.MULTIRUN:
            # One point of an ablation diverging says nothing about the others: report it, run the next one.
            point = f"point {HydraConfig.get().job.num} ({' '.join(HydraConfig.get().overrides.task)})"
            print(f"error: {point}: {e}; the sweep goes on", file=sys.stderr, flush=True)
            _DIVERGED_POINTS.append(point)
            return
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def main() -> None:
    from llmtrain.train.signals import install_early

    install_early()  # a SIGTERM/Ctrl-C from now on is acknowledged, not a silent exit 143
    register_configs()
    register_resolvers()
    from llmtrain.train import run_lock

    try:
        try:
            sys.argv[1:] = resolve_recipes(sys.argv[1:])
            preflight(sys.argv[1:])
            sys.argv += plan_before_hydra(sys.argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        _DIVERGED_POINTS.clear()
        _hydra_main()
        if _DIVERGED_POINTS:
            print(
                f"error: {len(_DIVERGED_POINTS)} sweep point(s) diverged: {'; '.join(_DIVERGED_POINTS)}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(TrainingError.exit_code)
    finally:
        run_lock.release_all()  # plan_before_hydra's: a later run in this process (tests) can take it
