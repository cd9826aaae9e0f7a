"""Recipes outside the repo: `recipe=/path/mine.yaml`, `--config-dir DIR recipe=mine` and
`hydra.searchpath=[file://DIR]` become one `hydra.searchpath` override, after the recipe file is checked."""

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from llmtrain.errors import UserError
from llmtrain.overrides import first_line

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")  # configs/ (recipes: configs/recipe)


def _split_search_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without --config-dir/-cd and hydra.searchpath, the directories they named, in order)."""
    rest, dirs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        elif arg.startswith("hydra.searchpath="):
            try:
                (ov,) = OverridesParser.create().parse_overrides([arg])
                entries = ov.value()
            except Exception as e:
                raise UserError(
                    f"{arg}: cannot parse it ({first_line(e)}); e.g. hydra.searchpath=[file:///DIR]"
                ) from None
            entries = entries if isinstance(entries, list) else [entries]
            for entry in map(str, entries):
                if not entry.startswith("file://"):
                    raise UserError(
                        f"{arg}: {entry!r}: llmtrain takes file:// entries only, e.g. [file:///DIR]"
                    )
                dirs.append(entry.removeprefix("file://"))
        else:
            rest.append(arg)
        i += 1
    return rest, [str(Path(d).expanduser().absolute()) for d in dirs]


def check_recipe_file(path: Path, key: str) -> None:
    """A recipe YAML parses (else file:line: problem) and is a `# @package _global_` file like the shipped ones."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{key}: cannot read {path} ({e.strerror})") from None
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{key}: {where}: YAML error: {problem}; fix the file") from None
    if body is not None and not isinstance(body, dict):
        raise UserError(f"{key}: {path} must hold a mapping of config keys (like recipes/tiny.yaml)")
    if "@package _global_" not in text.split("\n", 1)[0]:
        raise UserError(
            f"{key}: {path} must start with the line '# @package _global_' (as recipes/tiny.yaml does), "
            "so its keys land at the top of the config"
        )


def resolve_recipes(argv: list[str]) -> list[str]:
    """Recipes outside the repo: `recipe=/path/mine.yaml`, `--config-dir DIR recipe=mine` and
    `hydra.searchpath=[file://DIR]` (DIR/recipe/mine.yaml) all become one `hydra.searchpath=[...]` override
    that preflight composes with, as Hydra does; the recipe file is checked first (YAML error: file:line)."""
    import atexit
    import shutil
    import tempfile

    rest, dirs = _split_search_args(argv)
    out = []
    for arg in rest:
        key, _, value = arg.partition("=")
        if key in ("recipe", "+recipe") and (value.endswith((".yaml", ".yml")) or Path(value).is_file()):
            path = Path(value).expanduser().absolute()
            if not path.is_file():
                raise UserError(f"{arg}: no such file; pass a recipe name or the path of a .yaml file")
            check_recipe_file(path, arg)
            link_dir = Path(tempfile.mkdtemp(prefix="llmtrain-recipe-"))
            atexit.register(shutil.rmtree, link_dir, True)
            (link_dir / "recipe").mkdir()
            (link_dir / "recipe" / f"{path.stem}.yaml").symlink_to(path)
            dirs.append(str(link_dir))
            arg = f"recipe={path.stem}"
        elif key in ("recipe", "+recipe") and value:
            for d in [*dirs, CONFIG_DIR]:
                if (candidate := Path(d) / "recipe" / f"{value}.yaml").is_file():
                    check_recipe_file(candidate, arg)
                    break
        out.append(arg)
    if dirs:
        out.append("hydra.searchpath=[" + ",".join(f"'file://{d}'" for d in dirs) + "]")
    return out
