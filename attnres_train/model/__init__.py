"""The Kimi-Linear model with a switchable residual: AttnRes op, KDA, NoPE MLA, MoE wiring, specs.

Heavy (megatron) imports live in the submodules; import from them directly, e.g.
`from attnres_train.model.model import build_model`.
"""
