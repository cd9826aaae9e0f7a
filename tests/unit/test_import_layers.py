"""The package layering of docs/architecture.md ("Who may import whom"), checked on the source.

Each llmtrain package (or top-level module) lists the llmtrain packages it may import, lazily or not. A
new edge is a design decision: add it here and to the table in docs/architecture.md, or move the code.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "llmtrain"

LEAVES = {
    "errors",
    "argcheck",
    "models",
    "data",
    "analysis",
    "checkpoint_format",
    "metrics",
    "dist",
    "process_exit",
}
# The base under the leaves: one-line user errors, and the two kinds of them every layer meets (a write the
# file system refuses; an override Hydra cannot parse). They import errors only.
BASE = {"errors", "fsio", "override_syntax"}
MAY_IMPORT = {
    "errors": set(),
    "fsio": {"errors"},
    "override_syntax": {"errors"},
    "argcheck": {"errors"},
    "models": {"errors"},
    "data": {"errors", "fsio", "override_syntax"},
    "analysis": {"errors"},
    "checkpoint_format": {"errors", "fsio"},
    "metrics": {"errors"},
    "dist": {"errors"},
    "process_exit": set(),  # asks sys.modules whether llmtrain.dist made a group; imports nothing of ours
    # precision: format registry, named recipes, quantizers; the LR schedule for phase triggers
    "precision": {"errors", "models", "train"},
    # config: schema + validation; asks the registries (engines, launchers, schedules) for their names,
    # and data for the tokenizer its datasets were prepared with (data.provenance, preflight)
    "config": {"errors", "models", "precision", "engines", "launch", "train", "data"},
    "engines": {"errors", "models", "precision", "config", "dist", "convert", "checkpoint_format"},
    "convert": {"errors", "argcheck", "models", "config", "data", "dist", "engines", "checkpoint_format", "process_exit"},
    "train": {"errors", "fsio", "models", "precision", "config", "data", "dist", "engines", "metrics", "checkpoint_format"},
    "launch": {"errors", "dist", "dryrun", "checkpoint_format"},
    "eval": {"errors", "fsio", "argcheck", "models", "config", "data", "convert", "checkpoint_format"},
    "fit": {"errors", "config", "engines"},
    "dryrun": {"config", "engines", "models"},
    "overrides": {"errors", "override_syntax", "config"},
    "recipe_files": {"errors", "overrides"},
    "cli": {"config", "dist", "dryrun", "engines", "errors", "fit", "launch", "overrides", "recipe_files", "train"},
    "__main__": {"cli", "process_exit"},
}  # fmt: skip


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "llmtrain" and len(parts) > 1 else None


def imports_by_package() -> dict[str, dict[str, str]]:
    """package -> {imported package: the first file that imports it}."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel == Path("__init__.py"):
            continue
        me = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = (
                    [node.module] if node.module != "llmtrain" else [f"llmtrain.{a.name}" for a in node.names]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                other = _package(name)
                if other and other != me:
                    found.setdefault(me, {}).setdefault(other, str(rel))
    return found


def test_every_package_imports_only_what_the_layering_allows():
    bad = [
        f"{me} imports {other} ({where})"
        for me, edges in imports_by_package().items()
        for other, where in edges.items()
        if other not in MAY_IMPORT.get(me, set())
    ]
    assert not bad, "; ".join(bad)


def test_the_leaves_import_no_other_llmtrain_package_but_the_base():
    edges = imports_by_package()
    assert all(set(edges.get(leaf, {})) <= BASE for leaf in LEAVES)
    assert all(set(edges.get(base, {})) <= {"errors"} for base in BASE)
    assert set(MAY_IMPORT) >= set(edges)  # every package is in the table
