"""The command line's Hydra overrides as preflight needs them: their syntax, the jobs a `-m` sweep runs (as
Hydra's basic sweeper makes them) and a failed composition as one line. No torch; Hydra is needed anyway."""

import contextlib
import io
import re

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from llmtrain.errors import UserError
from llmtrain.override_syntax import first_line, parse_override, quoted

SEARCHPATH = "hydra.searchpath="


def user_overrides(argv: list[str]) -> list[str]:
    """key=value arguments that shape the job's config: not flags, not hydra.* (but the search path)."""
    return [
        a
        for a in argv
        if "=" in a
        and not a.startswith("-")
        and (a.startswith(SEARCHPATH) or not a.startswith(("hydra.", "hydra/")))
    ]


def hydra_arguments(argv: list[str]):
    """The command line as Hydra's own argparse parser reads it (flags, and `overrides`: the positional
    arguments); None where argparse refuses it, as Hydra then prints its usage line itself."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return get_args_parser().parse_args(argv)
    except SystemExit:  # a usage error, or --version
        return None


def check_flags_and_positionals(argv: list[str]) -> None:
    """What Hydra would refuse with a traceback or its multi-line parse error: --resolve without --cfg, two
    of its commands at once (-m --cfg job), and a positional argument that is no `key=value` (nor `~key`,
    which deletes a key)."""
    args = hydra_arguments(argv)
    if args is None:
        return
    if args.resolve and args.cfg is None and not args.help:
        raise UserError("--resolve only changes how --cfg prints the config; write --cfg job --resolve")
    commands = {"--run": args.run, "--multirun": args.multirun, "--cfg": args.cfg is not None}
    commands |= {"--info": args.info is not None, "--shell-completion": args.shell_completion}
    if sum(map(bool, commands.values())) > 1:
        given = " and ".join(k for k, v in commands.items() if v)
        raise UserError(f"{given}: Hydra does one of them per command; drop all but one")
    for arg in args.overrides:
        if "=" not in arg and not arg.startswith("~"):
            raise UserError(f"{arg}: not a key=value override; write {arg}=VALUE")


def check_override_syntax(argv: list[str], multirun: bool) -> None:
    """Every override, hydra.* included, parses, and a comma sweep comes with -m; else one line with a
    command-line form that works."""
    check_flags_and_positionals(argv)
    parser = OverridesParser.create()
    for arg in (a for a in argv if "=" in a and not a.startswith("-")):
        key, _, value = arg.partition("=")
        ov = parse_override(arg, parser)
        if ov.is_sweep_override() and not multirun:
            raise UserError(
                f"{arg}: a comma on the command line makes a sweep, which runs only with -m; for one value "
                f"that holds commas write {quoted(key, value)}"
            )


def sweep_points(overrides: list[str], config_name: str = "train") -> list[list[str]]:
    """The jobs `-m overrides` runs, each as the overrides its config is composed from, in Hydra's order.

    As Hydra's multirun does: compose once in MULTIRUN mode (a swept group is left out, so a swept recipe's
    own `hydra.sweeper.params` do not sweep), then the basic sweeper's expansion of those params plus the
    command line's overrides (the command line wins on the same key). Needs an initialised Hydra.
    """
    gh = GlobalHydra.instance()
    search = [o for o in overrides if o.startswith(SEARCHPATH)]  # Hydra applies it to every job
    try:
        cfg = gh.hydra.compose_config(config_name=config_name, overrides=overrides, run_mode=RunMode.MULTIRUN)
        params = [f"{k}={v}" for k, v in (OmegaConf.select(cfg, "hydra.sweeper.params") or {}).items()]
        task = list(cfg.hydra.overrides.task)
    except Exception:  # composing the first job (same overrides, one value each) reports the problem
        params, task = [], [o for o in overrides if o not in search]
    arguments = params + task
    try:
        parsed = OverridesParser.create(config_loader=gh.config_loader()).parse_overrides(arguments)
        (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except Exception as e:
        raise UserError(f"cannot parse overrides {' '.join(arguments)}: {first_line(e)}") from None
    if not jobs:  # e.g. a glob() matching nothing, or over a misspelled group: Hydra would run nothing
        raise UserError(
            f"the sweep {' '.join(arguments)} expands to no job; check the glob() pattern and the group name"
        )
    _refuse_schema_options(jobs)
    return [search + job for job in jobs]


def _refuse_schema_options(jobs: list[list[str]]) -> None:
    """glob() over a config group also lists the group's schema entry (precision_schema, ...), which Hydra
    would run as one more job with the schema's defaults: refuse it and name the options to list instead."""
    by_key: dict[str, list[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            by_key.setdefault(key, [])
            if value not in by_key[key]:
                by_key[key].append(value)
    for key, values in by_key.items():
        if any(v.endswith("_schema") for v in values):
            options = ",".join(v for v in values if not v.endswith("_schema"))
            raise UserError(
                f"{key}=glob(...): also matches the schema entry {key}_schema (Hydra would run it as a job of "
                f"its own); list the options instead: {key}={options}"
            )


def allowed_keys(parent: str) -> list[str]:
    from llmtrain.config.schema import Config

    node = OmegaConf.structured(Config)
    node = OmegaConf.select(node, parent) if parent else node
    return sorted(node.keys()) if node is not None and hasattr(node, "keys") else []


def describe_composition_error(exc: Exception, overrides: list[str]) -> str:
    """A Hydra/OmegaConf composition error as `key=value: problem (allowed: ...)`, from the exceptions'
    own fields (Hydra's missing config and its options, OmegaConf's full_key, the schema's keys)."""
    chain = [exc]  # Hydra wraps OmegaConf's error (raised from, or while handling, it) for a config file
    while len(chain) < 8 and (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(nxt)
    cause = next((e for e in chain if getattr(e, "full_key", None)), exc.__cause__ or exc)
    source = re.match(r"In '([^']+)': ", str(exc))  # the config file the bad key or value is in
    where_from = f" (in {source.group(1)}.yaml)" if source and cause is not exc else ""
    missing = next((e for e in (exc, cause) if isinstance(e, MissingConfigException)), None)
    if missing is not None and "/" in (missing.missing_cfg_file or ""):
        group, _, option = missing.missing_cfg_file.rpartition("/")
        allowed = ", ".join(dict.fromkeys(o for o in missing.options or [] if not o.endswith("_schema")))
        return f"{group}={option}: no such {group} config (allowed: {allowed})"
    full_key = getattr(cause, "full_key", None) or ""
    override = next((o for o in overrides if full_key and o.lstrip("+~").split("=")[0] == full_key), None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "key", None) is not None:
        parent, _, leaf = full_key.rpartition(".") if full_key else ("", "", str(cause.key))
        allowed = allowed_keys(parent)
        if leaf not in allowed:  # not "Missing key" or an interpolation's key: one the schema lacks
            where = parent or "the config"
            return (
                f"{override or full_key}{where_from}: unknown key '{leaf}' in {where} "
                f"(allowed: {', '.join(allowed)})"
            )
    msg = first_line(cause) if getattr(cause, "msg", None) else first_line(exc)
    if override:
        return f"{override}: {msg}"
    return f"{full_key}{where_from}: {msg}" if where_from and full_key else msg
