"""transformers' Kimi Linear modules, imported so that they run where this process runs.

transformers picks its KDA and short-convolution kernels when `modeling_kimi_linear` is imported:
fla's (Triton) and causal_conv1d's when those packages import, else its own PyTorch reference
functions. fla imports on a machine without a GPU too (our dev extra installs it, for its
reference checks) and then fails at the first call ("0 active drivers"). Without CUDA the module is
therefore imported with fla and causal_conv1d hidden, so that transformers falls back to torch.
Import transformers' Kimi Linear through `modeling()` before anything else imports it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

MODULE = "transformers.models.kimi_linear.modeling_kimi_linear"
KERNEL_PACKAGES = ("fla", "causal_conv1d")


@contextlib.contextmanager
def _hidden(packages):
    """`import p` raises ImportError for each package p inside the block."""
    saved = {p: sys.modules.get(p, False) for p in packages}
    for p in packages:
        sys.modules[p] = None  # the import system's "not importable" marker
    try:
        yield
    finally:
        for p, mod in saved.items():
            if mod is False:
                sys.modules.pop(p, None)
            else:
                sys.modules[p] = mod


def modeling():
    """transformers' modeling_kimi_linear, with the torch kernels where CUDA is missing."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    if torch.cuda.is_available():
        return importlib.import_module(MODULE)
    with _hidden(KERNEL_PACKAGES):
        return importlib.import_module(MODULE)
