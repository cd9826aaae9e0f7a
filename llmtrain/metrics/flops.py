"""Peak dense BF16 throughput of known accelerators, for MFU."""

import torch

# Dense (non-sparse) BF16 tensor-core peaks, TFLOP/s, from the vendors' datasheets.
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "B200": 2250.0,
    "GB200": 2500.0,
    "B300": 2500.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no meaningful peak for CPUs: MFU is not reported
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None
