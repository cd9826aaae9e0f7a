from llmtrain.engines.torch_engine.engine import TorchEngine

__all__ = ["TorchEngine"]
