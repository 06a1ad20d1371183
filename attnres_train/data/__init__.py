"""Data pipeline: text -> byte-level BPE -> megatron .bin/.idx -> GPTDataset -> resumable batches.

Flow (``build_datasets(cfg.data, seq_length=..., seed=..., train_samples=..., valid_samples=...)``):

1. Sources (``corpus.py``): ``data.paths`` empty means the bundled tinyshakespeare corpus
   (sha256-checked). A ``.txt`` is split at a line boundary (the last ``data.valid_fraction`` of the
   lines is validation; blank-line-separated blocks are documents), a ``.jsonl`` by records (one
   ``{"text": ...}`` per line, one document each). Anything else must be a prebuilt megatron prefix
   (PREFIX.bin + PREFIX.idx, training only; their validation prefixes go in ``data.valid_paths``).
2. Tokenizer (``tokenizer.py``): the user's ``data.tokenizer`` (a tokenizers tokenizer.json), or a
   byte-level BPE of ``data.vocab_size`` tokens trained on the training documents only, with
   ``<|endoftext|>`` as end of document (EOD).
3. Indexed datasets (``indexed.py``): one sequence per document, EOD appended, dtype uint16 below
   65,500 tokens, one prefix per source and split.
4. Datasets (``dataset.py``): megatron-core's ``GPTDataset`` via ``BlendedMegatronDatasetBuilder``
   with ``blend_per_split`` (train and valid from separate prefixes, blended by ``data.weights``).
   Samples are ``seq_length + 1`` token spans over the shuffled documents: tokens, labels,
   loss_mask, position_ids.
5. Batches: ``batch_indices`` gives each data-parallel rank its micro-batches of each global batch
   from ``consumed_samples`` (the data position a checkpoint saves; the same samples whatever the
   data-parallel size); ``collate``
   stacks them into [B, S] tensors; ``loader.MicroBatches`` is what the trainer iterates.

Cache layout under ``data.cache_dir`` (default ``.cache/data``); every entry is content-addressed,
written under a temporary name and renamed, and reused when its key matches:

    tokenizer/<sha256(source hashes, valid fractions, vocab size)>/tokenizer.json, meta.json
    indexed/<sha256(source hash, tokenizer sha256, train|valid, valid_fraction)>/data.bin, data.idx, meta.json
    samples/<sha256(prefixes + .idx hashes, tokenizer sha256, seq_length, flags)[:32]>/
        key.json and megatron's <md5>-GPTDataset-<split>-*.npy index files (per seed and size)

With torch.distributed initialised, rank 0 builds the tokenizer and prefixes first, then a barrier,
then the other ranks load them; megatron does the same for its sample indices.
"""

from attnres_train.data.corpus import DEFAULT_CORPUS_PATH, DEFAULT_CORPUS_SHA256, CorpusIntegrityError, TextSource
from attnres_train.data.dataset import (
    PreparedData,
    batch_indices,
    build_datasets,
    collate,
    prepare_data,
)
from attnres_train.data.tokenizer import EOD_TOKEN, BPETokenizer

__all__ = [
    "BPETokenizer", "CorpusIntegrityError", "DEFAULT_CORPUS_PATH", "DEFAULT_CORPUS_SHA256", "EOD_TOKEN", "PreparedData",
    "TextSource", "batch_indices", "build_datasets", "collate", "prepare_data",
]
