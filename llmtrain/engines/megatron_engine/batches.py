"""Micro-batches as Megatron wants them: on the GPU, and cut for context parallelism; mock ones for
dry_run=measure and the benchmarks."""

import torch

KEYS = ("tokens", "labels", "loss_mask")


def cp_slice(t: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """Megatron's load-balanced CP split: 2*cp chunks, rank r keeps chunks r and 2*cp-1-r.

    Causal attention costs more for later tokens; pairing an early with a late chunk evens the work,
    and TE's context-parallel attention expects exactly this order.
    """
    if cp_size == 1:
        return t
    chunks = t.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def prepare(micro_batch: dict, device: torch.device, cp_size: int = 1, cp_rank: int = 0) -> dict:
    out = {}
    for key in KEYS:
        t = cp_slice(micro_batch[key], cp_size, cp_rank)
        out[key] = t.to(device, non_blocking=True).contiguous()
    out["loss_mask"] = out["loss_mask"].float()
    return out


def mock_batches(
    n: int, mbs: int, seq: int, vocab: int, seed: int = 0, zipf: float | None = None
) -> list[dict]:
    """Mock data: `n` micro-batches as the data layer yields them, of uniform random tokens, or with
    `zipf=s` drawn from a Zipf(s) unigram law (a model can learn it without memorising the batches)."""
    gen = torch.Generator().manual_seed(seed)
    probs = None if zipf is None else torch.arange(1, vocab + 1, dtype=torch.float64).pow(-zipf)
    out = []
    for _ in range(n):
        if probs is None:
            t = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        else:
            t = torch.multinomial(probs, mbs * (seq + 1), replacement=True, generator=gen).view(mbs, seq + 1)
        out.append(
            {
                "tokens": t[:, :-1].contiguous(),
                "labels": t[:, 1:].contiguous(),
                "loss_mask": torch.ones(mbs, seq),
            }
        )
    return out
