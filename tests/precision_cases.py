"""The adversarial tensors the precision tests quantize (CPU reference, Triton interpreter, GPU parity).

One set, so a case added here reaches every quantizer test that takes all of them; each test picks a size
(rows x cols, cols a multiple of 32) and, where a case cannot apply to it, the names it takes.
"""

import torch

# Exact E2M1 grid midpoints once scaled (amax 6 -> NVFP4 S_enc * s_blk = 1): ties in every binade.
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0)

CASES = (
    "normal",  # Gaussian
    "heavy_tail",  # cubed Gaussian: a few large values per block
    "wide_range",  # log-normal magnitudes over ~28 binades, random signs
    "ragged",  # a shape that is a multiple of no block or tile (partial blocks are zero-padded)
    "tiny",  # ~1e-30: the quantized values sit near FP32's subnormals
    "scale_overflow",  # ~1e-37: 2688 / amax (NVFP4) and 448 / amax overflow FP32
    "huge",  # ~1e37: block scales near FP32 max
    "one_outlier",  # one 1e4 in 1e-3 noise: blocks far below the amax (E4M3 block scales underflow to 0)
    "e2m1_ties",  # exact midpoints of the E2M1 grid (round-half-to-even)
    "zero_blocks",  # all-zero blocks and an all-zero row inside a non-zero tensor
    "zero_rows",  # one all-zero row (its row amax is 0)
    "all_zero",
    "subnormal",  # 2**-12 noise under an amax of 1: E4M3/E2M1 subnormals after scaling
    "row_ranges",  # rows scaled from 1e-20 to 1e20 (per-row amaxes really differ)
)


def adversarial_tensors(
    dtype: torch.dtype = torch.float32,
    *,
    rows: int = 32,
    cols: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 7,
    names: tuple[str, ...] = CASES,
) -> dict[str, torch.Tensor]:
    """name -> [rows, cols] tensor (`ragged`: [rows + 5, cols + 18]) in `dtype`, drawn from `seed`."""
    if cols % 32:
        raise ValueError(f"cols={cols} must be a multiple of 32")
    unknown = set(names) - set(CASES)
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(r=rows, c=cols):
        return torch.randn(r, c, generator=g, device=device)

    out = {}
    for name in CASES:  # every case draws, so a case's values do not depend on which others are taken
        if name == "normal":
            t = randn()
        elif name == "heavy_tail":
            t = randn() ** 3 * 10
        elif name == "wide_range":
            t = torch.exp(randn() * 8) * torch.sign(randn())
        elif name == "ragged":
            t = randn(rows + 5, cols + 18)
        elif name == "tiny":
            t = randn() * 1e-30
        elif name == "scale_overflow":
            t = randn() * 1e-37
        elif name == "huge":
            t = randn() * 1e37
        elif name == "one_outlier":
            t = randn() * 1e-3
            t[3 % rows, 17] = 1e4
        elif name == "e2m1_ties":
            t = torch.tensor(E2M1_TIES * 4, device=device).repeat(rows, cols // 32)
            t[:, ::3] *= -1
        elif name == "zero_blocks":
            t = randn()
            t[:, : max(32, cols // 4)] = 0
            t[5 % rows] = 0
        elif name == "zero_rows":
            t = randn()
            t[5 % rows] = 0
        elif name == "all_zero":
            t = torch.zeros(rows, cols, device=device)
        elif name == "subnormal":
            t = randn() * 2.0**-12
            t[0, 0] = 1.0
        else:  # row_ranges
            t = randn() * torch.logspace(-20, 20, rows, device=device).view(-1, 1)
        if name in names:
            out[name] = t.to(dtype)
    return out
