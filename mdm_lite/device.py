"""Where a model runs and in which precision: the one device check of training and sampling.

`resolve_device` turns "auto", "cpu", "cuda" or "cuda:N" into a torch.device (refusing a GPU that
is not there); `choose_precision` decides whether the network runs under bf16 autocast. Training
(chapter 5) and the pipeline (chapter 7) both call them, so "auto" means the same in both.
"""
from __future__ import annotations

from typing import Annotated

import torch

from .config_check import ConfigError, Device, check_value

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU if one is visible, else the CPU; "cuda" -> GPU `local_rank`
    (torchrun's LOCAL_RANK, 0 outside torchrun); "cpu" and "cuda:N" as they are. A GPU asked for
    when none is visible, or a name that is none of these, is a ConfigError that names the fix."""
    name = str(name)
    check_value("device", name, Annotated[str, Device])
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no GPU is visible; use --device cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def choose_precision(precision: str, device: torch.device) -> tuple[bool, str]:
    """(use bf16 autocast, why) for `precision` ("fp32", "bf16" or "auto") on `device`.

    "auto" picks bf16 where the hardware computes it natively: GPUs of compute capability 8
    (Ampere) or newer (`is_bf16_supported()` also says yes on a T4, where bf16 is emulated and
    slow), and CPUs with bf16 dot products: AMX tiles (Intel Sapphire Rapids and newer; training
    measured 1.27-1.5x faster than fp32) or AVX512-BF16 (AMD Zen 4 and newer, Intel Cooper Lake;
    1.18x on a Zen 5). Elsewhere a CPU emulates bf16, 15-17x slower than fp32 where measured, so fp32.
    Only the network runs in bf16; losses, optimizer and sampler arithmetic stay fp32.
    """
    if precision != "auto":
        return precision == "bf16", f"--precision {precision}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        return native, f"GPU compute capability {major}.{minor} {'has' if native else 'lacks'} native bf16"
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True, "this CPU has AMX bf16 matrix units"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "this CPU has AVX512-BF16 dot products"
    return False, "this CPU lacks native bf16 (neither AMX nor AVX512-BF16)"
