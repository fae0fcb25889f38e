"""Device and dtype choices shared by every torch-backed component."""

from __future__ import annotations

from typing import Any

from ..errors import MissingExtra, UserError

DTYPES = ("auto", "float32", "float16", "bfloat16")


def import_torch() -> Any:
    """torch, or a one-line error naming the extra that installs it."""
    try:
        import torch
    except ImportError:
        raise MissingExtra("this component", "torch", "diffusers") from None
    return torch


def resolve_device(device: str) -> str:
    """`auto` -> cuda when there is one, else cpu; asking for cuda without it is exit 2."""
    torch = import_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available (use --device cpu)")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """A dtype name -> torch dtype; `auto` is float16 on cuda, float32 on cpu."""
    torch = import_torch()
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (expected one of {', '.join(DTYPES)})")
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
