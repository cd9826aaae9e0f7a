"""The light paths (config composition, validation, dry run, --cfg) import no training library, torch
included: each costs start-up time that a config check does not need (python -X importtime on 2 cores:
torch ~0.8-1.2 s, Megatron-Core ~0.8 s). A fresh interpreter per check: this test process has imported everything already."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

TRAINING_ONLY = ["transformers", "datasets", "megatron", "wandb", "rich", "triton"]


def imported_after(code: str) -> list[str]:
    """The TRAINING_ONLY (and torch) top-level packages that running `code` imported."""
    probe = (
        "import atexit, json, sys\n"
        f"heavy = {[*TRAINING_ONLY, 'torch']!r}\n"
        "atexit.register(lambda: print('IMPORTED', json.dumps([m for m in heavy if m in sys.modules])))\n"
        f"{code}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("IMPORTED ")), None)
    assert line is not None, proc.stderr[-2000:]
    return json.loads(line.removeprefix("IMPORTED "))


@pytest.mark.parametrize(
    "module",
    ["llmtrain.metrics", "llmtrain.config.estimate", "llmtrain.config.layout", "llmtrain.config.resolvers",
     "llmtrain.models", "llmtrain.dryrun"],
)  # fmt: skip
def test_light_modules_import_without_torch(module):
    assert imported_after(f"import {module}") == []


def test_the_config_schema_imports_without_torch():
    assert imported_after("import llmtrain.config.schema") == []


@pytest.mark.parametrize(
    "argv",
    [["recipe=llama3_8b", "precision=nvfp4", "dry_run=true"], ["recipe=tiny", "dry_run=true"],
     ["recipe=llama3_8b", "precision=fp8_cs", "--cfg", "job"]],
    ids=["megatron", "auto-engine", "cfg-job"],
)  # fmt: skip
def test_a_dry_run_or_a_config_print_imports_no_training_library(tmp_path, argv):
    """Not even torch: a dry run (0.6 s) or --cfg job (0.4 s) on 2 cores, 2.0 s and 1.5 s when they imported
    it. A run that trains imports torch when it starts training, after these checks."""
    code = (
        "import sys\n"
        f"sys.argv = ['llmtrain', *{argv!r}, 'hydra.run.dir={tmp_path}']\n"
        "from llmtrain.cli import main\n"
        "main()"
    )
    assert imported_after(code) == []
