"""Using what was trained: the transformers model of a checkpoint, built in memory
(`hf_model.load`), and `attnres-train-generate` (`generate.py`).

Decoding is transformers': its KV cache for MLA, its convolution and recurrent state for KDA, its
samplers. The model is the one an export writes (transformers' `kimi_linear` for the standard
residual, our `kimi_linear_attnres` for block and full AttnRes), built from the checkpoint without
writing it to disk.
"""
