"""Models in and out: Hugging Face Kimi Linear checkpoints <-> this project's checkpoints.

- `hf_config`: transformers' `KimiLinearConfig` fields <-> our ModelConfig (both ways; a field we
  do not support is refused by name).
- `hf_weights`: parameter names and layouts, ours (megatron, unsplit) <-> transformers' (the
  layout `save_pretrained` writes, and the released checkpoint's original remote-code names).
- `hf_files`: safetensors directories (one file or sharded with an index), read lazily, written
  shard by shard.
- `cli`: `attnres-train-convert import | export | config`.

The mapping is exact: a round trip HF -> ours -> HF gives bit-identical tensors, and an imported
model's logits equal transformers' own (tests/convert). docs/convert.md has the conventions.
"""
