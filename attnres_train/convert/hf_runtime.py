"""transformers' Kimi Linear modules, imported so that they run where this process runs.

transformers picks its KDA and short-convolution kernels when `modeling_kimi_linear` is imported:
fla's (Triton) and causal_conv1d's when those packages import, else its own PyTorch reference
functions. fla imports on a machine without a GPU too (our dev extra installs it, for its
reference checks) and then fails at the first call ("0 active drivers"). Without CUDA the module is
therefore imported with fla and causal_conv1d hidden. The AttnRes modeling file, which exports
carry, does the same when it is imported; `modeling()` imports through it. Import transformers'
Kimi Linear through `modeling()` before anything else imports it.
"""

from __future__ import annotations


def modeling():
    """transformers' modeling_kimi_linear, with the torch kernels where CUDA is missing."""
    from attnres_train.convert.hf_attnres.modeling_kimi_linear_attnres import kimi_linear_modeling

    return kimi_linear_modeling()
