"""Megatron-Core + Transformer Engine engine.

`MegatronEngine` is imported lazily: importing this package (e.g. for the weight mapping) never pulls in
Megatron-Core or TE, so the CPU suite runs without them.
"""

__all__ = ["MegatronEngine"]


def __getattr__(name: str):
    if name == "MegatronEngine":
        from llmtrain.engines.megatron_engine.engine import MegatronEngine

        return MegatronEngine
    raise AttributeError(name)
