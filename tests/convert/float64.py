"""KeepFloat64: run a float64 model without the float32 casts written into it.

transformers' Kimi Linear computes its norms, forget gate, router and KDA kernels in float32 by
explicit casts (`.float()`, `.to(torch.float32)`, `.type(torch.float32)`, `dtype=torch.float32`),
and megatron's router computes its sigmoid so. For a float64 model those casts are downcasts, and
a float64 comparison would measure float32 rounding. Inside this mode a float32 cast of a float64
tensor returns the tensor, and float32 factory calls make float64 tensors: both sides then compute
the same math in float64, so their logits agree to ~1e-15.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def _is_f32(x) -> bool:
    return x is torch.float32 or x == "torch.FloatTensor"


class KeepFloat64(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dtype == torch.float64:
            if func is torch.Tensor.float:
                return first
            if func in (torch.Tensor.to, torch.Tensor.type):
                rest = args[1:]
                target = kwargs.get("dtype", rest[0] if rest else None)
                if _is_f32(target) and not any(isinstance(a, torch.device) for a in rest):
                    return first
        if _is_f32(kwargs.get("dtype")):
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)
