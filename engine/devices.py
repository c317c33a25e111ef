"""Where the engine runs: parsing --device and reporting peak memory per device.

"auto" is CUDA when torch sees a GPU, else the CPU. A device that cannot be used here (CUDA on a
machine without it, an index past the last GPU, a name torch does not run us on) is refused in one
line before anything slow starts (model load, reading).
"""

from __future__ import annotations

import re
import resource

import torch

from .errors import UserError

CHOICES = "auto, cpu, cuda or cuda:N"


def parse_device(spec: str | torch.device | None) -> torch.device:
    """A --device value -> a usable torch.device, or a one-line UserError."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise UserError(f"device must be {CHOICES}, not '{spec}'")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"device '{spec}': CUDA is not available here (torch {torch.__version__}, {build}); "
                        "use --device cpu")
    count = torch.cuda.device_count()
    index = int(m.group(1) or 0)
    if index >= count:
        raise UserError(f"device '{spec}': this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak (RSS has no reset: it is the process's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory per device in MB: "cpu" is the process's peak RSS; a CUDA device adds
    torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve)."""
    out = {"cpu": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out[str(device)] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out
