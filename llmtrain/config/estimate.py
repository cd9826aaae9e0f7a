"""Back-of-envelope memory and batch arithmetic for dry runs and the "does it fit" check.

Megatron/TE (GPU, BF16 compute, FP32 main grads and Adam state), per pipeline stage:
  weights 2 B/param. TE caches the quantized layers' weights (those not in precision.bf16_layers) between
  micro-batches, once per GEMM direction: natively 2 x the format's bytes (row- and column-wise FP8/MXFP8/
  NVFP4), emulated 2 x 2 B (our quantizers hand TE dequantized BF16 copies). With the low-precision
  parameter all-gather (parallel.lowp_param_gather, Bridge's fp8_param_gather / fp4_param_gather) a
  quantized layer keeps no BF16 weight: the parameter is its row-wise low-precision data, plus the
  column-wise copy. From the 4-layer proxy (docs/benchmarks.md): FP8-CS peaked 0.9 GiB above BF16 = 2 B/param
  of copies less the FP8-saved GEMM inputs; emulated MXFP8/NVFP4 3.3 GiB above = 4 B/param.
  grads 4 B/param (the FP32 main-grad buffer of Megatron-Core's DDP: the engine sets grad_reduce_in_fp32).
  optimizer 12 B/param (FP32 master + two moments), divided by dp*cp with the distributed optimizer.
  Checked on an H200: the 4-layer Llama 3 8B proxy (seq 8192, BF16) estimates 46.9 GiB and peaked at
  46.5 GiB allocated (docs/benchmarks.md). `dry_run=measure` prints each component next to its measurement.
Torch engine on CPU (FP32): weights 4, grads 4, Adam 8 B/param.
Activations per layer and token: the BF16 tensors a Llama layer keeps for backward, about
2*(5h + 2*kv + 4*ffn) bytes (flash attention: no s^2 term), over tp with sequence parallelism; a full
recompute keeps only the layer input (2h). Natively quantized layers save their GEMM inputs (qkv and fc1:
h, proj: h/tp, fc2: ffn/tp) in the activation format instead of BF16. Layers in flight follow Megatron's 1F1B schedule: stage s of pp
holds pp - s micro-batches of its L/pp layers (the first stage: all L); interleaved (vpp > 1) it holds
(pp - s - 1)*2 + (vpp - 1)*pp + 1 chunks of L/(pp*vpp) layers. Logits (last stage only): 10 B per token
and vocab entry over tp (FP32 logits + grad, BF16 copy).
"""

from dataclasses import dataclass

from llmtrain.config.layout import Layout
from llmtrain.models import ModelSpec
from llmtrain.precision.recipes import RECIPES, lowp_param_gather_recipes
from llmtrain.precision.registry import FORMATS

GIB = 2**30
LOWP_ELEMENT_BYTES = {n: f.bytes_per_element for n, f in FORMATS.items()}  # with scales
# Precisions whose Megatron-Bridge recipe keeps the parameters in low precision for the all-gather.
BRIDGE_LOWP_PARAM_GATHER = lowp_param_gather_recipes()


@dataclass
class MemoryEstimate:
    weights: float  # parameters as stored (BF16, or low precision with the low-precision all-gather)
    grads: float
    optimizer: float
    activations: float
    weight_copies: float = 0.0  # TE's cached copies of the quantized layers' weights
    logits: float = 0.0  # part of `activations`: the last stage's logits
    stage: int = 0  # pipeline stage this estimate is for

    @property
    def total(self) -> float:
        return self.weights + self.weight_copies + self.grads + self.optimizer + self.activations

    def line(self) -> str:
        return (
            f"weights {(self.weights + self.weight_copies) / GIB:.1f} | grads {self.grads / GIB:.1f} | "
            f"optimizer {self.optimizer / GIB:.1f} | activations {self.activations / GIB:.1f} | total "
            f"{self.total / GIB:.1f} GiB"
        )


def layout_of(cfg, world: int) -> Layout:
    """The layout the estimate assumes for `world` ranks: config/layout's Layout plus grad_accum, read from
    the config without config/layout.check_layout's checks (validation runs those)."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    dp = p.dp or max(world // model_parallel, 1)
    grad_accum = max(cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp), 1)
    return Layout(
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        cp=p.cp,
        dp=dp,
        sequence_parallel=bool(p.sequence_parallel),
        grad_accum=grad_accum,
    )


def layers_on_stage(num_layers: int, pp: int, vpp: int, stage: int) -> list[int]:
    """0-based global layer numbers on pipeline stage `stage` (Megatron's interleaved assignment)."""
    chunk = num_layers // (pp * vpp)
    return [(v * pp + stage) * chunk + i for v in range(vpp) for i in range(chunk)]


def layers_in_flight(num_layers: int, pp: int, vpp: int, stage: int, micro_batches: int) -> float:
    """Layer activations stage `stage` keeps at its peak under Megatron's (interleaved) 1F1B schedule."""
    if pp == 1:
        return float(num_layers)
    if vpp == 1:
        return min(pp - stage, micro_batches) * num_layers / pp
    chunks = min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, micro_batches * vpp)
    return chunks * num_layers / (pp * vpp)


def emulated_planned(cfg) -> bool:
    """Whether the dry run assumes llmtrain's emulation: where the config asks for it (backend=custom) or the
    named recipe has no TE recipe (e.g. mxfp4); auto otherwise assumes a GPU where TE runs the recipe
    natively. The engine decides for the GPU it runs on."""
    named = RECIPES.get(cfg.precision.name)  # an unknown name is preflight's error, not the estimate's
    if named is None or not named.quantized:
        return False
    return cfg.precision.backend == "custom" or named.native is None


def lowp_param_gather_planned(cfg, shards: int) -> bool:
    """parallel.lowp_param_gather as the dry run assumes it: null (auto) = on where Bridge turns it on,
    with the distributed optimizer sharded over `shards` = dp*cp > 1 ranks (one shard gathers nothing),
    unless the config asks for llmtrain's emulation (backend=custom). The engine decides for the GPU it
    runs on (engines/megatron_engine/param_gather.py)."""
    p, prec = cfg.parallel, cfg.precision
    want = p.get("lowp_param_gather")
    if want is not None:
        return bool(want)
    return (
        prec.name in BRIDGE_LOWP_PARAM_GATHER
        and bool(p.distributed_optimizer)
        and prec.backend != "custom"
        and shards > 1
    )


def _stage_estimate(
    cfg, spec: ModelSpec, lay: Layout, stage: int, param_gather: bool, emulated: bool
) -> MemoryEstimate:
    par, prec = cfg.parallel, cfg.precision
    first_stage, last_stage = stage == 0, stage == lay.pp - 1
    layers = layers_on_stage(spec.num_layers, lay.pp, lay.vpp, stage)
    per_layer_linear = spec.layer_linear_params() / lay.tp
    embed = spec.vocab_size * spec.hidden_size / lay.tp
    params = len(layers) * (per_layer_linear + 2 * spec.hidden_size / lay.tp)
    params += embed * (first_stage + (last_stage and (not spec.tie_embeddings or lay.pp > 1)))
    lo, hi = int(prec.bf16_layers.first), spec.num_layers - int(prec.bf16_layers.last)
    element = LOWP_ELEMENT_BYTES.get(prec.weight_format, 0.0)
    quantized_layers = sum(lo <= n < hi for n in layers) if element else 0
    quantized = quantized_layers * per_layer_linear
    if emulated:  # TE caches our dequantized BF16 weights, row- and column-wise
        weights, weight_copies = 2 * params, 4 * quantized
    elif param_gather:  # the parameter is the row-wise low-precision data; TE adds the column-wise copy
        weights, weight_copies = 2 * (params - quantized) + element * quantized, element * quantized
    else:
        weights, weight_copies = 2 * params, 2 * element * quantized
    grads = 4 * params
    optimizer = 12 * params / (lay.dp * lay.cp if par.distributed_optimizer else 1)

    tokens = cfg.train.micro_batch_size * spec.seq_length / lay.cp
    h, kv, f = spec.hidden_size, spec.kv_dim, spec.ffn_hidden_size
    sp = lay.tp if par.sequence_parallel and lay.tp > 1 else 1
    if par.recompute == "full":
        per_token_layer = 2 * h / sp
    else:
        per_token_layer = 2 * 5 * h / sp + 2 * (2 * kv + 4 * f) / lay.tp
    if quantized_layers and not emulated and par.recompute != "full":
        saved = (2 - LOWP_ELEMENT_BYTES.get(prec.activation_format, 2.0)) * (2 * h / sp + (h + f) / lay.tp)
        per_token_layer -= saved * quantized_layers / len(layers)
    in_flight = layers_in_flight(spec.num_layers, lay.pp, lay.vpp, stage, lay.grad_accum)
    logits = 10 * tokens * spec.vocab_size / lay.tp if last_stage else 0.0
    activations = tokens * per_token_layer * in_flight + logits
    return MemoryEstimate(weights, grads, optimizer, activations, weight_copies, logits, stage)


def estimate_memory(
    cfg,
    lay: Layout,
    engine: str,
    stage: int | None = None,
    param_gather: bool | None = None,
    emulated: bool | None = None,
) -> MemoryEstimate:
    """Memory per GPU (megatron) or process (torch). stage: a pipeline stage; None = the busiest one.
    param_gather / emulated: whether the low-precision parameter all-gather is on and the precision runs
    emulated (the engine knows, for its GPU); None = as the config plans them."""
    spec = ModelSpec.from_config(cfg.model)
    if engine == "torch":  # FP32 on CPU; the math attention path keeps the s^2 scores
        params = spec.num_params()
        tokens = cfg.train.micro_batch_size * spec.seq_length
        h, kv, f = spec.hidden_size, spec.kv_dim, spec.ffn_hidden_size
        weights, grads, optimizer = 4 * params, 4 * params, 8 * params
        per_layer = 4 * tokens * (5 * h + 2 * kv + 4 * f) + 4 * cfg.train.micro_batch_size * (
            spec.num_attention_heads * spec.seq_length**2
        )
        activations = spec.num_layers * per_layer + 12 * tokens * spec.vocab_size
        return MemoryEstimate(weights, grads, optimizer, activations)
    if param_gather is None:
        param_gather = lowp_param_gather_planned(cfg, lay.dp * lay.cp)
    if emulated is None:
        emulated = emulated_planned(cfg)
    stages = range(lay.pp) if stage is None else [stage]
    estimates = (_stage_estimate(cfg, spec, lay, s, param_gather, emulated) for s in stages)
    return max(estimates, key=lambda m: m.total)
