"""The engine protocol the training loop drives. One engine = one model + optimizer on this process."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmtrain.dist import close_process_group


@dataclass
class StepResult:
    loss: float  # mean loss over the global batch (all DP ranks)
    grad_norm: float  # before clipping
    skipped: bool = False  # non-finite loss or gradient: the update was not applied


def _nothing() -> None:
    return None


@dataclass
class PendingWrite:
    """A checkpoint whose state is already snapshotted (training may change the weights now).

    `write` writes this rank's files from the snapshot (in a background thread); `finalize` runs on the
    training thread of every rank after every rank's `write` returned (collectives allowed)."""

    write: Callable[[], None] = _nothing
    finalize: Callable[[], None] = _nothing


# A micro-batch as the data layer yields it: tokens/labels [mbs, seq] (int64), loss_mask [mbs, seq] (float).
MicroBatch = dict[str, torch.Tensor]


class Engine(ABC):
    name: str = "base"
    backend_description: str = ""  # what actually runs, e.g. "torch cpu fp32" or "TE native NVFP4"

    @property
    @abstractmethod
    def dp_rank(self) -> int: ...

    @property
    @abstractmethod
    def dp_size(self) -> int: ...

    def begin_step(self, step: int) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Called before train_step with the 1-based step number (seeds per-step randomness, e.g. SR)."""

    @abstractmethod
    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        """Forward/backward over this DP rank's micro-batches, all-reduce, clip, optimizer step at `lr`."""

    @abstractmethod
    def eval_loss(self, micro_batches: list[MicroBatch], quantized: bool = True) -> float:
        """Mean loss over the micro-batches (all DP ranks), no gradients.

        quantized=False: the same weights with every GEMM unquantized (BF16, as a bf16 run computes).
        """

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model + optimizer state into `directory` (which exists; the caller makes it atomic)."""

    def start_save(self, directory: Path) -> PendingWrite:
        """Take a consistent host-memory snapshot of model + optimizer now; write it later (async save).

        Engines without a snapshot path write synchronously here, so async saving still works, only
        without the gain."""
        self.save(directory)
        return PendingWrite()

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote."""

    def probe_quantization_noise(self, micro_batches: list[MicroBatch], step: int):
        """sqrt(3) monitor after optimizer step `step`, on this rank's share of one global batch.

        Returns a precision.monitor.NoiseProbe (None if unsupported or nothing is quantized) and leaves
        the training state (weights, grads, optimizer, RNG, SR streams, QAF mode) untouched.
        """
        return None

    def set_phase(self, recipe) -> None:
        """A precision phase starts: quantize every GEMM outside the BF16 layers as `recipe` (a
        PrecisionRecipe) says from the next step on. See llmtrain/precision/phases.py."""
        raise NotImplementedError(f"the {self.name} engine cannot switch precision phases")

    def set_qaf(self, active: bool) -> None:
        """Quantization-aware finetuning: forward stays quantized, backward/update in high precision."""
        if active:
            raise NotImplementedError(f"the {self.name} engine has no quantization-aware finetuning switch")

    def memory_stats(self) -> dict[str, float]:
        return {}

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        """The last call (the training loop's, when the run ends however it ends): let go of the process
        group llmtrain created. Engines that hold more (the Megatron engine's GPU memory) free it too."""
        close_process_group()
