"""The reference engine: the model family's plain-PyTorch model, AdamW, data parallelism with DDP (gloo on CPU)."""

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from llmtrain import precision
from llmtrain.checkpoint_format import umask_mode
from llmtrain.dist import DistInfo, init_process_group
from llmtrain.engines.base import Engine, MicroBatch, PendingWrite, StepResult
from llmtrain.engines.select import check_cuda_available
from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.models import ModelSpec
from llmtrain.models.layers import causal_lm_loss
from llmtrain.precision.modes import unquantized


def pick_device(requested: str, dist: DistInfo) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    check_cuda_available(requested)
    return torch.device("cuda", dist.local_rank % torch.cuda.device_count())


def host_copy(obj, memo: dict | None = None):
    """A deep copy of a state dict in host memory that shares no storage with the live training state
    (`.cpu()` alone returns the same tensor on CPU, which the next optimizer step would change). Objects
    shared in `obj` stay shared (one betas tuple for all groups), so torch.save writes the same bytes."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.detach().to("cpu", copy=True)
    elif isinstance(obj, dict):
        out = {k: host_copy(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [host_copy(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        items = [host_copy(v, memo) for v in obj]
        out = obj if all(a is b for a, b in zip(items, obj, strict=True)) else type(obj)(items)
    else:
        return obj
    memo[id(obj)] = out
    return out


def model_loss(model, mb: MicroBatch) -> torch.Tensor:
    return causal_lm_loss(model(mb["tokens"]), mb["labels"], mb["loss_mask"])


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, cfg, dist: DistInfo):
        p = cfg.parallel
        if p.tp != 1 or p.pp != 1 or p.cp != 1:
            raise ConfigError(
                "parallel",
                f"tp={p.tp} pp={p.pp} cp={p.cp}",
                "the torch engine runs data parallel only; "
                "use engine=megatron for tensor/pipeline/context parallelism",
                ["tp=1 pp=1 cp=1"],
            )
        self.cfg, self.dist = cfg, dist
        self.device = pick_device(cfg.train.device, dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_process_group(dist, "nccl" if self.device.type == "cuda" else "gloo")

        self.spec = ModelSpec.from_config(cfg.model)
        torch.manual_seed(cfg.train.seed)  # same init on every rank, whatever the RNG history
        model = self.spec.model_family.build_model(self.spec)
        model.init_weights(torch.Generator().manual_seed(cfg.train.seed))
        if cfg.train.init_from:
            from llmtrain.convert import init_weights_from

            init_weights_from(cfg.train.init_from, model)
        precision.convert_model(model, cfg.precision, seed=cfg.train.seed)
        self.model = model.to(self.device)
        self.ddp = DDP(self.model) if dist.world_size > 1 else None
        self.optimizer = self._build_optimizer(cfg.optim)
        # Autocast BF16 only where it is fast (CUDA); the CPU reference computes in FP32.
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        mode = "bf16 autocast" if self.autocast else "fp32"
        self.backend_description = (
            f"torch {self.device.type} {mode}, precision={cfg.precision.name} (emulated)"
        )
        if cfg.precision.name == "bf16":
            self.backend_description = f"torch {self.device.type} {mode}"

    def _build_optimizer(self, o) -> torch.optim.Optimizer:
        # No weight decay on norms (1-D params), as Megatron does.
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)

    @property
    def dp_rank(self) -> int:
        return self.dist.rank

    @property
    def dp_size(self) -> int:
        return self.dist.world_size

    def _to_device(self, mb: MicroBatch) -> MicroBatch:
        return {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}

    def _loss(self, module, mb: MicroBatch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model_loss(module, self._to_device(mb))

    def begin_step(self, step: int) -> None:
        precision.begin_step(self.model, step)

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        module = self.ddp or self.model
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            last = i == n - 1
            ctx = self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext()
            with ctx:
                loss = self._loss(module, mb) / n
                loss.backward()
            total += loss.detach()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        loss_value, norm_value = total.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss=loss_value, grad_norm=norm_value, skipped=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return StepResult(loss=loss_value, grad_norm=norm_value)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[MicroBatch], quantized: bool = True) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        with nullcontext() if quantized else unquantized(self.model):
            for mb in micro_batches:
                total += self._loss(self.model, mb)
        total /= max(len(micro_batches), 1)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        return total.item()

    def probe_quantization_noise(self, micro_batches: list[MicroBatch], step: int):
        """The sqrt(3) probe on this rank's share of a global batch, in the training's autocast."""
        batches = [self._to_device(mb) for mb in micro_batches]
        return precision.probe_quantization_noise(self.model, batches, self._loss, step)

    def set_phase(self, recipe) -> None:
        precision.set_recipe(self.model, recipe)

    def set_qaf(self, active: bool) -> None:
        precision.set_qaf(self.model, active)

    def model_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.spec.tie_embeddings:
            state.pop("lm_head.weight", None)  # stored once, as embed_tokens.weight
        return state

    @staticmethod
    def _write(directory: Path, model_state: dict, optimizer_state: dict) -> None:
        save_file(model_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        umask_mode(directory / "model.safetensors")
        torch.save(optimizer_state, directory / "optimizer.pt")

    def save(self, directory: Path) -> None:
        if not self.dist.is_main:  # replicated state: rank 0 writes it
            return
        self._write(directory, self.model_state(), self.optimizer.state_dict())

    def start_save(self, directory: Path) -> PendingWrite:
        if not self.dist.is_main:
            return PendingWrite()
        model_state = host_copy(self.model_state())
        optimizer_state = host_copy(self.optimizer.state_dict())
        return PendingWrite(write=lambda: self._write(directory, model_state, optimizer_state))

    def load(self, directory: Path) -> None:
        state = load_file(str(directory / "model.safetensors"), device="cpu")
        if self.spec.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {directory} does not match model {self.spec.name}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; resume with the same model config or train.resume=never"
            )
        optim_path = directory / "optimizer.pt"
        if optim_path.exists():
            self.optimizer.load_state_dict(
                torch.load(optim_path, map_location=self.device, weights_only=True)
            )

    def memory_stats(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
        return {}
