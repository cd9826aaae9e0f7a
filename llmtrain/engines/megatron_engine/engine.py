"""MegatronEngine: Megatron-Core's GPTModel with Transformer Engine layers behind llmtrain's Engine protocol.

One process per GPU (torchrun); the same code runs on 1 GPU and on N. Megatron and TE are imported here
only, and this module is imported only when engine=megatron is chosen, so the CPU install never needs TE.
"""

import contextlib
import logging
import math
import os
from functools import partial
from pathlib import Path

import torch

from llmtrain import precision
from llmtrain.dist import DistInfo, close_process_group, init_process_group
from llmtrain.engines.base import Engine, MicroBatch, StepResult
from llmtrain.engines.megatron_engine import batches, checkpoint, mapping, param_gather, settings
from llmtrain.errors import UserError
from llmtrain.models import ModelSpec
from llmtrain.models.spec import STRUCTURAL
from llmtrain.precision import te_recipes

log = logging.getLogger(__name__)


def require_runtime() -> tuple[str, str]:
    """Fail with one line unless CUDA, TE and Megatron-Core are usable; return their versions."""
    if not torch.cuda.is_available():
        raise UserError("engine=megatron needs a CUDA GPU; use engine=torch on this machine")
    try:
        import transformer_engine
        import transformer_engine.pytorch  # must come before transformer_engine_torch
        from megatron.core import package_info
    except ImportError as exc:
        raise UserError(
            f"engine=megatron needs Transformer Engine and Megatron-Core ({exc}); "
            "install them with: pip install 'llmtrain[gpu]'"
        ) from exc
    return package_info.__version__, transformer_engine.__version__


def _grad_accum_fusion_available() -> bool:
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def _te_backward_override_available() -> bool:
    """TE >= 2.20's recipes take backward_override (None | "high_precision" | "dequantized")."""
    import dataclasses

    from transformer_engine.common import recipe as te_recipe

    return "backward_override" in {f.name for f in dataclasses.fields(te_recipe.Float8CurrentScaling)}


class _NativeBackward:
    """backward_override for Megatron's native TE recipes: Megatron builds a recipe object per layer and
    forward (fp8_utils.get_fp8_recipe / fp4_utils.get_fp4_recipe) without that field, so the engine wraps
    both builders once and sets the field on what they return while `mode` is not None. The same wrapper
    sets the precision layer's `recipe_fields` (te_recipes.precision_settings' te_recipe_fields) on the
    recipes that declare them."""

    mode: str | None = None
    recipe_fields: dict | None = None
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        import dataclasses

        from megatron.core import fp4_utils, fp8_utils

        for module, name in ((fp8_utils, "get_fp8_recipe"), (fp4_utils, "get_fp4_recipe")):
            original = getattr(module, name, None)
            if original is None:
                continue

            def build(config, _original=original):
                recipe = _original(config)
                declared = (
                    {f.name for f in dataclasses.fields(recipe)} if dataclasses.is_dataclass(recipe) else ()
                )
                if cls.recipe_fields and set(cls.recipe_fields) <= set(declared):
                    recipe = dataclasses.replace(recipe, **cls.recipe_fields)
                if cls.mode is None or not hasattr(recipe, "backward_override"):
                    return recipe
                return dataclasses.replace(recipe, backward_override=cls.mode)

            setattr(module, name, build)
        cls.installed = True


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed loss; Megatron divides the gradients by the global token count (per-token loss)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    loss = torch.sum(losses * mask)
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens.detach()])}


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg, dist: DistInfo):
        mcore_version, te_version = require_runtime()
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig

        self.cfg, self.dist = cfg, dist
        self.spec = ModelSpec.from_config(cfg.model)
        self.layout = settings.resolve_layout(cfg.parallel, self.spec, dist.world_size)
        torch.cuda.set_device(dist.local_rank)
        self.device = torch.device("cuda", torch.cuda.current_device())
        capability = torch.cuda.get_device_capability(self.device)
        precision.validate(cfg.precision, self.spec.num_layers, self.layout.pp)
        precision_kwargs, precision_desc = te_recipes.precision_settings(
            cfg.precision, capability, self.spec.num_layers
        )
        backend, why_not_native = te_recipes.resolve_backend(cfg.precision, capability)
        self.emulated = backend == "custom"
        self.base_recipe = precision.PrecisionRecipe.from_config(cfg.precision)
        if self.emulated:  # our quantizers inside TE: its checks, then the factory reads this recipe
            tokens = int(cfg.train.micro_batch_size) * self.spec.seq_length // self.layout.cp
            te_recipes.start_emulation(
                cfg.precision, self.base_recipe, int(cfg.train.seed), tokens, why_not_native
            )
        _NativeBackward.recipe_fields = precision_kwargs.pop("te_recipe_fields", None)
        if _NativeBackward.recipe_fields:
            # TE 2.20 added those recipe fields together with backward_override.
            te_recipes.require_te_recipe_fields(
                _NativeBackward.recipe_fields, _te_backward_override_available()
            )
            _NativeBackward.install()
        self.native_quant = {k: precision_kwargs.get(k) for k in ("fp8", "fp4")}  # for phases turning it off
        _NativeBackward.mode = None  # the base recipe's backward, whatever an earlier engine left
        if not self.emulated and self.base_recipe.quantized:
            te_recipes.require_native_phases(cfg.precision, _te_backward_override_available())
        self.lowp_param_gather = param_gather.resolve(
            cfg.parallel, cfg.precision, capability, self.layout.dp * self.layout.cp
        )
        gather_tc, gather_ddp, gather_opt = param_gather.megatron_kwargs(
            cfg.precision, self.lowp_param_gather
        )

        self._init_parallel(ps)
        config_kwargs = settings.transformer_config_kwargs(
            self.spec, cfg.parallel, self.layout, precision_kwargs
        )
        config_kwargs.update(gather_tc)
        notes = []
        if config_kwargs["gradient_accumulation_fusion"] and not _grad_accum_fusion_available():
            # Megatron's own output-layer linear needs apex's extension for it; TE layers alone can't have it.
            config_kwargs["gradient_accumulation_fusion"] = False
            notes.append("grad_accum_fusion off (apex fused_weight_gradient_mlp_cuda not installed)")
        self.config = TransformerConfig(**config_kwargs)
        self.models = self._build_models(ps)  # unwrapped GPTModel chunks (checkpoint/weight I/O)
        ddp_config = DistributedDataParallelConfig(**settings.ddp_config_kwargs(cfg.parallel), **gather_ddp)
        self.ddp_models = [
            DistributedDataParallel(self.config, ddp_config, m, disable_bucketing=i > 0)
            for i, m in enumerate(self.models)
        ]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(**settings.optimizer_config_kwargs(cfg.optim, cfg.parallel), **gather_opt),
            self.ddp_models,
            use_gloo_process_groups=self._gloo,
        )
        self._wire_schedule(finalize_model_grads)
        if cfg.train.init_from:
            self._init_from(str(cfg.train.init_from))

        lay = self.layout
        self.backend_description = (
            f"Megatron-Core {mcore_version} + TE {te_version}: {precision_desc}; "
            f"tp={lay.tp} pp={lay.pp} vpp={lay.vpp} cp={lay.cp} dp={lay.dp} sp={lay.sequence_parallel} "
            f"dist_opt={bool(cfg.parallel.distributed_optimizer)} recompute={cfg.parallel.recompute} "
            f"lowp_param_gather={self.lowp_param_gather}" + "".join(f"; {n}" for n in notes)
        )
        if dist.is_main:
            log.info("engine: %s", self.backend_description)

    # ---- setup -------------------------------------------------------------------------------------
    def _init_parallel(self, ps) -> None:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            init_process_group(self.dist, "nccl", single_process=True)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        lay = self.layout
        # dry_run=measure's fake backend cannot host gloo groups (its FakeStore stores nothing); only
        # checkpointing could use them, and a measured dry run saves none.
        self._gloo = torch.distributed.get_backend() != "fake"
        ps.initialize_model_parallel(
            tensor_model_parallel_size=lay.tp,
            pipeline_model_parallel_size=lay.pp,
            virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
            context_parallel_size=lay.cp,
            create_gloo_process_groups=self._gloo,
        )
        # Megatron-LM's convention: same init on all DP ranks, different per pipeline stage.
        seed = int(self.cfg.train.seed) + 100 * ps.get_pipeline_model_parallel_rank()
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    def _build_models(self, ps) -> list:
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec(
            **self.spec.model_family.megatron.layer_spec_kwargs()
        )
        theta = self.spec.rope_theta
        models = []
        for vp in range(self.layout.vpp):
            vp_stage = vp if self.layout.vpp > 1 else None
            model = GPTModel(
                config=self.config,
                transformer_layer_spec=layer_spec,
                vocab_size=self.spec.vocab_size,
                max_sequence_length=self.spec.seq_length,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                share_embeddings_and_output_weights=self.spec.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=int(theta) if float(theta).is_integer() else theta,
                vp_stage=vp_stage,
            )
            models.append(model.cuda(self.device))
        return models

    def _wire_schedule(self, finalize_model_grads) -> None:
        """Hooks the pipeline schedules call, as Megatron-LM's training loop sets them."""

        def one_or_list(fns):
            return fns[0] if len(fns) == 1 else fns

        self.config.no_sync_func = one_or_list([m.no_sync for m in self.ddp_models])
        if self.cfg.parallel.overlap_grad_reduce:
            self.config.grad_sync_func = one_or_list([m.start_grad_sync for m in self.ddp_models])
        self.config.finalize_model_grads_func = finalize_model_grads

    # ---- protocol ----------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    def _forward_step(self, data_iterator, model):
        b = next(data_iterator)
        output = model(b["tokens"], None, None, labels=b["labels"])  # per-token loss [mbs, seq]
        return output, partial(_loss_func, b["loss_mask"])

    def _run(
        self, micro_batches: list[MicroBatch], forward_only: bool, reduce: bool = True
    ) -> torch.Tensor | None:
        """Megatron's schedule over the micro-batches; the mean token loss as a 0-d GPU tensor (reduce), read
        by the caller when it needs the number, so the host does not wait for the GPU mid-step."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cp_size, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        prepared = [batches.prepare(mb, self.device, cp_size, cp_rank) for mb in micro_batches]
        mbs, seq = micro_batches[0]["tokens"].shape
        iters = [iter(prepared) for _ in self.ddp_models]  # each virtual stage walks the same batches
        data = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.ddp_models,
            num_microbatches=len(prepared),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
        return self._reduce_loss(ps, data) if reduce else None

    def _reduce_loss(self, ps, data: list) -> torch.Tensor:
        """Mean token loss over the global batch, on every rank (only the last stage computes it)."""
        total = torch.zeros(2, device=self.device, dtype=torch.float32)
        for item in data:
            total += item["lm loss"].float()
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if self.layout.pp > 1:
            torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        return total[0] / total[1].clamp_min(1.0)

    def begin_step(self, step: int) -> None:
        if self.emulated:
            from llmtrain.precision import te_custom

            te_custom.begin_step(step)

    def set_phase(self, recipe) -> None:
        """A precision phase starts. Emulated: every quantizer reads `recipe` from now on. Native TE: the
        switches TE can make (te_recipes.native_phase_mode, checked at build): the whole backward to high
        precision (the recipes' backward_override="high_precision") or quantization off (BF16)."""
        if self.emulated:
            from llmtrain.precision import te_custom

            te_custom.set_recipe(recipe)
            return
        mode = te_recipes.native_phase_mode(self.base_recipe, recipe)
        if mode is None:
            raise UserError(
                f"TE's native recipe cannot run this precision phase ({recipe.describe()}); "
                "set precision.backend=custom"
            )
        quant_on = mode != "off"
        self.config.fp8 = self.native_quant["fp8"] if quant_on else None
        self.config.fp4 = self.native_quant["fp4"] if quant_on else None
        if mode == "high_precision":
            _NativeBackward.install()
        _NativeBackward.mode = "high_precision" if mode == "high_precision" else None

    def set_qaf(self, active: bool) -> None:
        if active and not self.emulated:
            raise UserError(
                "quantization-aware finetuning needs llmtrain's quantizers: set precision.backend=custom"
            )
        if self.emulated:
            from llmtrain.precision import te_custom

            te_custom.set_qaf(active)

    def _quantized_weights(self) -> dict:
        """Weights of the TE linears that run quantized (not in the BF16 first/last layers), by name."""
        first, last = precision.recipe.bf16_layer_counts(self.cfg.precision, self.spec.num_layers)
        out = {}
        for model in self.models:
            for layer in model.decoder.layers:
                if not first <= layer.layer_number - 1 < self.spec.num_layers - last:
                    continue
                for name, param in layer.named_parameters():
                    if name.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                                      "linear_fc2.weight")):  # fmt: skip
                        out[f"layers.{layer.layer_number - 1}.{name.removesuffix('.weight')}"] = param
        return out

    @contextlib.contextmanager
    def _unquantized(self):
        """Every TE linear in plain BF16, native or emulated back end.

        Megatron enters TE's FP8/FP4 autocast per layer only while config.fp8 / config.fp4 is set, and
        reads them at every forward (TransformerBlock.forward); every module shares self.config.
        """
        saved = (self.config.fp8, self.config.fp4)
        self.config.fp8, self.config.fp4 = None, None
        try:
            yield
        finally:
            self.config.fp8, self.config.fp4 = saved

    def probe_quantization_noise(self, micro_batches: list[MicroBatch], step: int):
        """sqrt(3) probe (precision/monitor.py) on this rank's share of one global batch.

        Four gradient passes through Megatron's own schedule over all micro-batches, with every DP grad
        sync held off; each pass's local main_grad of the quantized weights is summed over DP x CP ranks
        and divided by the batch's token count (the per-token mean gradient the optimizer applies) before
        any norm is taken. Per-layer squared norms are then summed over TP shards and gathered over
        pipeline stages. Needs the emulated back end (QAF mode, SR streams); clobbers the gradient
        buffers, which train_step zeroes first, and restores everything else it touches.
        """
        if not self.emulated:
            return None
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        from llmtrain.precision import monitor, te_custom

        weights = self._quantized_weights()
        params = list(weights.values())
        key_a, key_b = monitor.probe_keys(step)
        tokens = torch.stack([mb["loss_mask"].float().sum() for mb in micro_batches]).sum().to(self.device)
        torch.distributed.all_reduce(tokens, group=ps.get_data_parallel_group())  # CP ranks share batches

        def gradient(kind: str) -> torch.Tensor:
            for m in self.ddp_models:
                m.zero_grad_buffer()
            te_custom.set_qaf(kind == "qaf")
            te_custom.STATE.step, te_custom.STATE.calls = (key_b if kind == "redraw" else key_a), 0
            with contextlib.ExitStack() as stack:
                if kind == "full":
                    stack.enter_context(self._unquantized())
                for m in self.ddp_models:  # no grad-ready hook may start a DP reduction
                    stack.enter_context(m.no_sync())
                self._run(micro_batches, forward_only=False, reduce=False)
            if not params:
                return torch.zeros(0, device=self.device)
            flat = torch.cat([p.main_grad.detach().float().reshape(-1) for p in params])
            torch.distributed.all_reduce(flat, group=ps.get_data_parallel_group(with_context_parallel=True))
            return flat / tokens.clamp_min(1.0)

        cfg = self.config
        saved_hooks = (cfg.finalize_model_grads_func, cfg.grad_sync_func, cfg.no_sync_func)
        saved_emulation = (te_custom.STATE.qaf, te_custom.STATE.step, te_custom.STATE.calls)
        cuda_rng, tracker_rng = torch.cuda.get_rng_state(self.device), get_cuda_rng_tracker().get_states()
        # The schedule's own no_sync would end before the last micro-batch and let its hooks reduce.
        cfg.finalize_model_grads_func, cfg.grad_sync_func, cfg.no_sync_func = None, None, None
        try:
            with self._params_synced():
                table = monitor.noise_table(gradient, [p.numel() for p in params])
        finally:
            cfg.finalize_model_grads_func, cfg.grad_sync_func, cfg.no_sync_func = saved_hooks
            te_custom.STATE.qaf, te_custom.STATE.step, te_custom.STATE.calls = saved_emulation
            torch.cuda.set_rng_state(cuda_rng, self.device)
            get_cuda_rng_tracker().set_states(tracker_rng)
            for m in self.ddp_models:
                m.zero_grad_buffer()
        torch.distributed.all_reduce(table, group=ps.get_tensor_model_parallel_group())  # TP shards
        per_stage = dict(zip(weights, table.tolist()))
        if self.layout.pp > 1:
            gathered = [None] * self.layout.pp
            torch.distributed.all_gather_object(
                gathered, per_stage, group=ps.get_pipeline_model_parallel_group()
            )
            per_stage = {k: v for part in gathered for k, v in part.items()}
        return monitor.noise_probe(list(per_stage), list(per_stage.values()))

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        for m in self.ddp_models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        settings.set_lr(self.optimizer, lr, float(self.cfg.optim.weight_decay))
        loss_on_gpu = self._run(micro_batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()  # grad_norm is taken before clipping
        # Read after the optimizer step is queued: one wait for the GPU per step, at its end (the bare loop's).
        loss = loss_on_gpu.item()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=not ok or not math.isfinite(loss))

    @contextlib.contextmanager
    def _params_synced(self):
        """With overlapped param all-gather, weights are only complete once the next forward ran."""
        if not self.cfg.parallel.overlap_param_gather:
            yield
            return
        for m in self.ddp_models:
            m.disable_forward_pre_hook()  # also finishes the pending all-gather
        try:
            yield
        finally:
            for m in self.ddp_models:
                m.enable_forward_pre_hook()

    def eval_loss(self, micro_batches: list[MicroBatch], quantized: bool = True) -> float:
        mode = contextlib.nullcontext() if quantized else self._unquantized()
        with self._params_synced(), torch.no_grad(), mode:
            return self._run(micro_batches, forward_only=True).item()

    def save(self, directory: Path) -> None:
        """Collective: every rank calls it with the same directory."""
        with self._params_synced():
            checkpoint.save(self.models, self.optimizer, Path(directory))

    def start_save(self, directory: Path):
        """Collective. Async save: shards snapshotted to host memory now, written in the background."""
        with self._params_synced():
            return checkpoint.start_save(self.models, self.optimizer, Path(directory))

    def load(self, directory: Path) -> None:
        with self._params_synced():
            checkpoint.load(self.models, self.optimizer, Path(directory))

    def memory_stats(self) -> dict[str, float]:
        gib = 2.0**30  # mem_gib: peak allocated, the key the torch engine reports too
        return {
            "mem_gib": torch.cuda.max_memory_allocated(self.device) / gib,
            "mem_reserved_gib": torch.cuda.memory_reserved(self.device) / gib,
        }

    # ---- weights from / to the torch reference model ------------------------------------------------
    @torch.no_grad()
    def load_reference_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load full weights of the family's reference model (HF names); each rank takes its shard."""
        from megatron.core import parallel_state as ps

        full = mapping.reference_to_megatron(state_dict, self.spec)
        tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        for model in self.models:
            numbers = [layer.layer_number for layer in model.decoder.layers]
            for name, param in model.named_parameters():
                key = mapping.local_to_global_name(name, numbers)
                if key == "output_layer.weight" and self.spec.tie_embeddings:
                    key = "embedding.word_embeddings.weight"  # last stage's copy of the tied weight
                param.copy_(mapping.tp_shard(key, full[key], tp_size, tp_rank, self.spec.family))
        self.optimizer.reload_model_params()  # FP32 main weights follow the new model weights

    def _init_from(self, path: str) -> None:
        """train.init_from: an HF model directory or an llmtrain checkpoint, as the torch engine takes it."""
        from llmtrain.convert.api import load_state

        spec, state, _ = load_state(path)
        for key in STRUCTURAL:
            if getattr(spec, key) != getattr(self.spec, key):
                raise UserError(
                    f"train.init_from={path}: model.{key}={getattr(self.spec, key)} but the "
                    f"checkpoint has {getattr(spec, key)}; set model.{key}={getattr(spec, key)}"
                )
        self.load_reference_state_dict(state)
        if self.dist.is_main:
            log.info("initialized from %s", path)

    @torch.no_grad()
    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights under the torch reference model's names (tp=pp=1 only), FP32 on the CPU."""
        if self.layout.tp * self.layout.pp > 1:
            raise NotImplementedError("reference_state_dict needs tp=pp=1; save a checkpoint instead")
        model = self.models[0]
        numbers = [layer.layer_number for layer in model.decoder.layers]
        mg = {
            mapping.local_to_global_name(n, numbers): p.detach().float().cpu()
            for n, p in model.named_parameters()
        }
        return mapping.megatron_to_reference(mg, self.spec)

    def close(self) -> None:
        """The last call: frees the process group and lets the GPU memory go.

        The model chunks reference each other (the config holds their DDP hooks, DDP wraps the module that
        holds the config), so only a garbage-collector pass frees them, and only once nothing outside the
        cycle points at them. A caller that still holds this engine (bench.py and the GPU tests build the
        next engine in the same process) would otherwise keep its weights and FP32 gradient buffer
        allocated (~7 GiB at 1B) through the next engine's run and peak.
        """
        from megatron.core import parallel_state as ps

        config = getattr(self, "config", None)
        if config is not None:
            config.no_sync_func = config.grad_sync_func = config.finalize_model_grads_func = None
        self.optimizer, self.ddp_models, self.models = None, [], []
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        close_process_group()  # only a group llmtrain created (llmtrain.dist)
