"""Back-of-envelope memory and batch arithmetic for dry runs and the "does it fit" check.

Megatron/TE (GPU, BF16 compute, FP32 main grads and Adam state):
  weights 2 B/param (+1 B FP8 or ~0.56 B NVFP4 copies of the layer weights), grads 4 B/param (the
  FP32 main-grad buffer of Megatron-Core's DDP: the engine sets grad_reduce_in_fp32=True),
  optimizer 12 B/param (FP32 master + two moments), divided by dp*cp with the distributed optimizer.
  Checked on an H200: the 4-layer Llama 3 8B proxy (seq 8192, BF16) estimates 46.9 GiB and peaked at
  46.5 GiB allocated (docs/benchmarks.md).
Torch engine on CPU (FP32): weights 4, grads 4, Adam 8 B/param.
Activations per layer and token: the BF16 tensors a Llama layer keeps for backward, about
2*(5h + 2*kv + 4*ffn) bytes (flash attention: no s^2 term), over tp with sequence parallelism; a full
recompute keeps only the layer input (2h). The first pipeline stage holds pp micro-batches in flight, i.e.
all L layers' worth. Logits: 10 B per token and vocab entry (FP32 logits + grad, BF16 copy).
"""

from dataclasses import dataclass

from llmtrain.models import ModelSpec

GIB = 2**30
LOWP_WEIGHT_COPY_BYTES = {"fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "mxfp8": 1.03, "nvfp4": 0.5625}


@dataclass
class Layout:
    world: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int
    grad_accum: int


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def line(self) -> str:
        return (
            f"weights {self.weights / GIB:.1f} | grads {self.grads / GIB:.1f} | optimizer "
            f"{self.optimizer / GIB:.1f} | activations {self.activations / GIB:.1f} | total "
            f"{self.total / GIB:.1f} GiB"
        )


def layout_of(cfg, world: int) -> Layout:
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    dp = p.dp or max(world // model_parallel, 1)
    grad_accum = max(cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp), 1)
    return Layout(world=world, tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, vpp=p.vpp, grad_accum=grad_accum)


def _params_on_busiest_stage(spec: ModelSpec, lay: Layout) -> float:
    per_layer = spec.layer_linear_params() + 2 * spec.hidden_size
    layers = spec.num_layers / lay.pp * per_layer / lay.tp
    embed = spec.vocab_size * spec.hidden_size / lay.tp
    # With pp == 1 one stage holds the input embedding and (unless tied) the output head.
    embeddings = embed * (1 if spec.tie_embeddings or lay.pp > 1 else 2)
    return layers + embeddings


def estimate_memory(cfg, lay: Layout, engine: str) -> MemoryEstimate:
    spec = ModelSpec.from_config(cfg.model)
    par, prec = cfg.parallel, cfg.precision
    params = _params_on_busiest_stage(spec, lay)
    tokens = cfg.train.micro_batch_size * spec.seq_length / lay.cp
    h, kv, f = spec.hidden_size, spec.kv_dim, spec.ffn_hidden_size
    if engine == "torch":  # FP32 on CPU; the math attention path keeps the s^2 scores
        weights, grads, optimizer = 4 * params, 4 * params, 8 * params
        per_layer = 4 * tokens * (5 * h + 2 * kv + 4 * f) + 4 * cfg.train.micro_batch_size * (
            spec.num_attention_heads * spec.seq_length**2
        )
        activations = spec.num_layers * per_layer + 12 * tokens * spec.vocab_size
        return MemoryEstimate(weights, grads, optimizer, activations)
    layer_params = spec.num_layers / lay.pp * spec.layer_linear_params() / lay.tp
    copy = LOWP_WEIGHT_COPY_BYTES.get(prec.weight_format, 0.0) * layer_params
    weights = 2 * params + copy
    grads = 4 * params
    optimizer = 12 * params / (lay.dp * lay.cp if par.distributed_optimizer else 1)
    if par.recompute == "full":
        per_token_layer = 2 * h / (lay.tp if par.sequence_parallel else 1)
    else:
        shared = 2 * 5 * h / (lay.tp if par.sequence_parallel else 1)
        per_token_layer = shared + 2 * (2 * kv + 4 * f) / lay.tp
    in_flight_layers = spec.num_layers  # first stage: pp micro-batches x L/pp layers
    activations = tokens * per_token_layer * in_flight_layers + 10 * tokens * spec.vocab_size / lay.tp
    return MemoryEstimate(weights, grads, optimizer, activations)
