import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel tests run in Triton's interpreter on the CPU. Triton reads this once, so it must be
    # set before anything (a test module, transformers, torch._dynamo) first imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- Transformer Engine's pure-Python reference quantizers (tests/unit/test_quant_te_reference.py) ----
#
# TE's Python package is a small py3-none-any wheel; its custom_recipes/reference_*.py need only torch once
# the compiled parents are stubbed. The wheel is downloaded once (pip download --no-deps) into
# $LLMTRAIN_TE_CACHE (default ~/.cache/llmtrain/te-<version>) and unpacked there. A failed download fails
# the tests. Offline: LLMTRAIN_TE_SRC=<dir holding transformer_engine/> uses an unpacked copy, and
# LLMTRAIN_TE_OFFLINE=1 skips these tests instead (dev machines only).
TE_VERSION = "2.20.2"


def _te_src() -> Path:
    if src := os.environ.get("LLMTRAIN_TE_SRC"):
        return Path(src)
    cache = Path(
        os.environ.get("LLMTRAIN_TE_CACHE", Path.home() / ".cache" / "llmtrain" / f"te-{TE_VERSION}")
    )
    if (cache / "transformer_engine" / "pytorch" / "custom_recipes" / "reference_nvfp4.py").is_file():
        return cache
    if os.environ.get("LLMTRAIN_TE_OFFLINE") == "1":
        pytest.skip("LLMTRAIN_TE_OFFLINE=1: TE reference tests skipped (unset it, or set LLMTRAIN_TE_SRC)")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache),
           f"transformer-engine=={TE_VERSION}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wheels = sorted(cache.glob(f"transformer_engine-{TE_VERSION}-py3-none-any.whl"))
    if proc.returncode or not wheels:
        pytest.fail(
            f"could not download transformer-engine=={TE_VERSION} for the TE reference tests "
            f"({proc.stderr.strip().splitlines()[-1:] or proc.returncode}); fix the network, or set "
            "LLMTRAIN_TE_SRC=<unpacked wheel> or LLMTRAIN_TE_OFFLINE=1",
            pytrace=False,
        )
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(cache, [n for n in z.namelist() if n.startswith("transformer_engine/")])
    return cache


def _import_te_reference(src: Path) -> types.SimpleNamespace:
    """Import custom_recipes.reference_* with stub parents, then restore sys.modules as it was, so a real
    TE installation (on the GPU host) is neither shadowed nor replaced; the modules keep their globals."""
    root = src / "transformer_engine"
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "transformer_engine"}

    def stub(name, path=None, **attrs):
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = [str(path)]
        m.__dict__.update(attrs)
        sys.modules[name] = m

    class Quantizer:
        def __init__(self, *, rowwise: bool, columnwise: bool) -> None:
            self.rowwise_usage, self.columnwise_usage = rowwise, columnwise
            self.internal, self.optimize_for_gemm = False, False

    class QuantizedTensorStorage:
        pass

    try:
        stub("transformer_engine", root)
        stub("transformer_engine.pytorch", root / "pytorch")
        stub("transformer_engine.pytorch.quantized_tensor", Quantizer=Quantizer,
             QuantizedTensorStorage=QuantizedTensorStorage)  # fmt: skip
        stub("transformer_engine.pytorch.tensor", root / "pytorch" / "tensor")
        stub("transformer_engine.pytorch.tensor.utils", is_custom=lambda t: True)
        stub("transformer_engine.pytorch.custom_recipes", root / "pytorch" / "custom_recipes")
        import transformer_engine.pytorch.custom_recipes.reference_current_scaling as cs
        import transformer_engine.pytorch.custom_recipes.reference_nvfp4 as nv
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "transformer_engine"]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(nvfp4=nv, current_scaling=cs, src=src)


@pytest.fixture(scope="session")
def te_reference() -> types.SimpleNamespace:
    """TE 2.20's reference quantizer modules: `.nvfp4` (NVFP4QuantizerRef), `.current_scaling`."""
    return _import_te_reference(_te_src())
