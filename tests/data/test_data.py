"""Data pipeline: bundled corpus split and numbers, BPE, .bin/.idx cache, user inputs, errors, sampler.

The default corpus is built once per module (a tmp cache dir); user-input tests write small files
cut from the bundled corpus into tmp_path.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from attnres_train.config.schema import DataConfig
from attnres_train.data import (
    BPETokenizer,
    CorpusIntegrityError,
    batch_indices,
    build_datasets,
    collate,
    prepare_data,
)
from attnres_train.data import corpus as corpus_mod
from attnres_train.data import indexed as indexed_mod
from attnres_train.data import tokenizer as tokenizer_mod
from attnres_train.errors import ConfigError

SEQ = 64
TRAIN_TOKENS, VALID_TOKENS = 311_536, 33_637
TRAIN_DOCS, VALID_DOCS = 6_381, 842
SMALL_VOCAB = 400  # for user-file tests: fast BPE


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data_cache")
    prep = prepare_data(DataConfig(), cache_dir=cache)
    train, valid, tok = build_datasets(DataConfig(), seq_length=SEQ, seed=1234, train_samples=None, valid_samples=None,
                                       cache_dir=cache)
    return SimpleNamespace(cache=cache, prep=prep, train=train, valid=valid, tok=tok)


def _corpus_lines():
    with open(corpus_mod.DEFAULT_CORPUS_PATH, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def _read_doc(prefix: str, i: int):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)  # keep it alive while reading: its __del__ unmaps the file
    ids = ds[i].tolist()
    del ds
    return ids


# ------------------------------------------------------------------------------------------------
# bundled corpus: split, documents, tokens
# ------------------------------------------------------------------------------------------------
def test_default_split_lines_and_documents(default_build):
    src = corpus_mod.default_corpus()
    assert (src.num_units, src.num_train_units, src.num_valid_units) == (40_000, 36_000, 4_000)
    train_docs, valid_docs = list(src.documents("train")), list(src.documents("valid"))
    assert (len(train_docs), len(valid_docs)) == (TRAIN_DOCS, VALID_DOCS)
    # the cut is at a line boundary, mid-speech: valid starts with line 36,001
    lines = _corpus_lines()
    assert valid_docs[0].split("\n")[0] == lines[36_000] == "She vied so fast, protesting oath on oath,"
    assert train_docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    p = default_build.prep
    assert [(x.role, x.num_documents) for x in p.train + p.valid] == [("train", TRAIN_DOCS), ("valid", VALID_DOCS)]


def test_default_token_counts_and_sample_counts(default_build):
    p = default_build.prep
    assert p.train[0].num_tokens == TRAIN_TOKENS  # including one EOD per document
    assert p.valid[0].num_tokens == VALID_TOKENS
    assert os.path.getsize(p.train[0].prefix + ".bin") == 2 * TRAIN_TOKENS  # uint16
    tok = default_build.tok
    assert (tok.vocab_size, tok.eod) == (4096, 0)
    assert tok.id_to_token(tok.eod) == "<|endoftext|>"
    # one epoch at seq 64: (tokens - 1) // 64 samples
    assert len(default_build.train) == (TRAIN_TOKENS - 1) // SEQ == 4_867
    assert len(default_build.valid) == (VALID_TOKENS - 1) // SEQ == 525


def test_written_documents_decode_to_the_text(default_build):
    src = corpus_mod.default_corpus()
    tok = default_build.tok
    train_docs, valid_docs = list(src.documents("train")), list(src.documents("valid"))
    for role, docs, prefix in (("train", train_docs, default_build.prep.train[0].prefix),
                               ("valid", valid_docs, default_build.prep.valid[0].prefix)):
        for i in (0, 1, len(docs) // 2, len(docs) - 1):
            ids = _read_doc(prefix, i)
            assert ids[-1] == tok.eod and tok.eod not in ids[:-1], (role, i)
            assert tok.detokenize(ids[:-1]) == docs[i], (role, i)


def test_samples(default_build):
    s = default_build.train[0]
    assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == s["labels"].shape == (SEQ,)
    assert s["tokens"].dtype == torch.int64 and s["loss_mask"].dtype == torch.float32
    assert torch.equal(s["position_ids"], torch.arange(SEQ))
    assert bool((s["loss_mask"] == 1).all())
    b = collate([default_build.train[i] for i in range(4)])
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    assert {k: tuple(v.shape) for k, v in b.items()} == {k: (4, SEQ) for k in keys}
    # labels are the next tokens
    t = default_build.train[7]
    assert torch.equal(t["tokens"][1:], t["labels"][:-1])


# ------------------------------------------------------------------------------------------------
# tokenizer and caches
# ------------------------------------------------------------------------------------------------
def test_tokenizer_deterministic_and_cached(default_build, tmp_path):
    tok2, info = tokenizer_mod.load_or_train([corpus_mod.default_corpus()], 4096, tmp_path)
    assert info["trained"] and info["documents"] == TRAIN_DOCS
    assert tok2.sha256 == default_build.tok.sha256
    # the adapter's identity survives a save/load round trip
    assert BPETokenizer.from_file(info["path"]).sha256 == tok2.sha256
    assert default_build.tok.unique_identifiers == {"class": "BPETokenizer", "sha256": tok2.sha256, "vocab_size": 4096}
    json.dumps(default_build.tok.unique_identifiers)


def test_cache_reuse_does_not_retrain_or_rewrite(default_build, monkeypatch):
    cache = default_build.cache
    p = default_build.prep
    files = [p.tokenizer_info["path"], p.train[0].prefix + ".bin", p.train[0].prefix + ".idx",
             p.valid[0].prefix + ".bin"]
    before = {f: os.stat(f).st_mtime_ns for f in files}

    def boom(*a, **k):
        raise AssertionError("cache miss: rebuilt")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", boom)
    monkeypatch.setattr("megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder", boom)
    train, valid, tok = build_datasets(DataConfig(), seq_length=SEQ, seed=1234, train_samples=None, valid_samples=None,
                                       cache_dir=cache)
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
    assert tok.sha256 == default_build.tok.sha256
    assert torch.equal(train[123]["tokens"], default_build.train[123]["tokens"])
    assert len(os.listdir(cache / "indexed")) == 2  # no temporary folders left behind


def test_interrupted_write_leaves_no_trusted_cache(tmp_path, monkeypatch):
    src = corpus_mod.text_source(_small_txt(tmp_path, 0, 400), 0.1)
    tok = BPETokenizer(tokenizer_mod.train_bpe(src.documents("train"), SMALL_VOCAB))
    real = tok.tokenize_batch
    calls = {"n": 0}

    def dies(texts):
        calls["n"] += 1
        raise KeyboardInterrupt  # a killed run, mid-write

    monkeypatch.setattr(tok, "tokenize_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        indexed_mod.build_indexed(src, "train", tok, tmp_path / "c")
    assert calls["n"] == 1 and os.listdir(tmp_path / "c" / "indexed") == []
    # a leftover temporary folder (as from kill -9) is never read
    (tmp_path / "c" / "indexed" / ".tmp-deadbeef-x").mkdir()
    monkeypatch.setattr(tok, "tokenize_batch", real)
    p = indexed_mod.build_indexed(src, "train", tok, tmp_path / "c")
    assert p.built and p.num_documents > 0


def test_modified_corpus_is_caught(tmp_path, monkeypatch):
    data = bytearray(corpus_mod.DEFAULT_CORPUS_PATH.read_bytes())
    data[1000] = ord("#") if data[1000] != ord("#") else ord("@")
    bad = tmp_path / "tinyshakespeare.txt"
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_PATH", bad)
    with pytest.raises(CorpusIntegrityError, match=r"modified or truncated: sha256 is [0-9a-f]{64}, expected "
                                                   r"86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"):
        prepare_data(DataConfig(), cache_dir=tmp_path / "c")
    bad.write_bytes(bytes(data[:5000]))
    with pytest.raises(CorpusIntegrityError, match=str(bad)):
        corpus_mod.default_corpus()


# ------------------------------------------------------------------------------------------------
# user inputs
# ------------------------------------------------------------------------------------------------
def _small_txt(tmp_path, start, stop, name="part.txt"):
    path = tmp_path / name
    path.write_text("\n".join(_corpus_lines()[start:stop]) + "\n", encoding="utf-8")
    return str(path)


def _small_jsonl(tmp_path, start, stop, name="part.jsonl"):
    lines = _corpus_lines()[start:stop]
    docs, block = [], []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block) + "\n")
            block = []
    path = tmp_path / name
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return str(path), docs


def test_txt_and_jsonl_blend(tmp_path):
    txt = _small_txt(tmp_path, 0, 2000)
    jsonl, jdocs = _small_jsonl(tmp_path, 20_000, 22_000)
    cfg = DataConfig(paths=[txt, jsonl], weights=[0.7, 0.3], vocab_size=SMALL_VOCAB)
    train, valid, tok = build_datasets(cfg, seq_length=32, seed=7, train_samples=200, valid_samples=20,
                                       cache_dir=tmp_path / "cache")
    assert tok.vocab_size == SMALL_VOCAB and tok.eod == 0
    assert len(train) == 200  # 140 + 60
    assert 20 <= len(valid) <= 21  # sources in proportion to their tokens, each share rounded up
    ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert ids.count(0) == 140 and ids.count(1) == 60
    s = train[5]
    assert set(s) == {"dataset_id", "tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == (32,)
    b = collate([train[i] for i in range(3)])
    assert b["tokens"].shape == b["loss_mask"].shape == (3, 32)
    # jsonl split: the last 10% of the records is validation, one document per record
    src = corpus_mod.text_source(jsonl, 0.1)
    assert src.num_units == len(jdocs)
    assert list(src.documents("valid")) == jdocs[len(jdocs) - round(len(jdocs) * 0.1):]
    # txt split: 1,800 / 200 lines
    assert corpus_mod.text_source(txt, 0.1).unit_range("valid") == (1800, 2000)
    # one epoch of each source when no size is asked for and no weights given
    train2, valid2, _ = build_datasets(DataConfig(paths=[txt, jsonl], vocab_size=SMALL_VOCAB), seq_length=32, seed=7,
                                       train_samples=None, valid_samples=None, cache_dir=tmp_path / "cache")
    assert len(valid2) > 0 and len(train2) > 0


def test_no_validation_split(tmp_path):
    txt = _small_txt(tmp_path, 0, 500)
    train, valid, _ = build_datasets(DataConfig(paths=[txt], valid_fraction=0.0, vocab_size=300), seq_length=16, seed=1,
                                     train_samples=10, valid_samples=None, cache_dir=tmp_path / "c")
    assert valid is None and len(train) >= 10


def test_prebuilt_prefixes_and_user_tokenizer(default_build, tmp_path):
    p = default_build.prep
    cfg = DataConfig(paths=[p.train[0].prefix], valid_paths=[p.valid[0].prefix], tokenizer=p.tokenizer_info["path"])
    train, valid, tok = build_datasets(cfg, seq_length=SEQ, seed=1234, train_samples=None, valid_samples=None,
                                       cache_dir=tmp_path / "c")
    assert tok.sha256 == default_build.tok.sha256
    assert len(train) == len(default_build.train) and len(valid) == len(default_build.valid)
    assert torch.equal(valid[3]["tokens"], default_build.valid[3]["tokens"])
    # prebuilt ids beyond a smaller tokenizer's vocabulary
    small = tmp_path / "small.json"
    BPETokenizer(tokenizer_mod.train_bpe(["hello world\n"] * 10, 300)).save(small)
    with pytest.raises(ConfigError, match=r"data.paths=.*holds token id \d+ but the tokenizer has \d+ tokens"):
        build_datasets(DataConfig(paths=[p.train[0].prefix], tokenizer=str(small)), seq_length=SEQ, seed=1,
                       train_samples=None, valid_samples=None, cache_dir=tmp_path / "c")


def test_user_tokenizer_eod_fallback(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def make(specials):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.train_from_iterator(["some text here\n"] * 5, trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        path = tmp_path / f"tok{len(specials)}.json"
        t.save(str(path))
        return str(path)

    assert BPETokenizer.from_file(make(["<pad>", "</s>"])).eod == 1
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*no end-of-document token"):
        BPETokenizer.from_file(make([]))


def test_progress_bar_on_stderr(tmp_path, capsys):
    src = corpus_mod.text_source(_small_txt(tmp_path, 0, 300), 0.1)
    tok = BPETokenizer(tokenizer_mod.train_bpe(src.documents("train"), SMALL_VOCAB))
    indexed_mod.build_indexed(src, "train", tok, tmp_path / "c", show_progress=True)
    err = capsys.readouterr().err
    assert "tokenizing part.txt [train]" in err and "270/270" in err


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def _build(cfg, tmp_path, seq=SEQ):
    return build_datasets(cfg, seq_length=seq, seed=1, train_samples=None, valid_samples=None, cache_dir=tmp_path / "c")


def test_seq_length_longer_than_split(default_build):
    with pytest.raises(ConfigError, match=r"valid split of tinyshakespeare has 33,637 tokens; model.seq_length=40000 "
                                          r"needs at least 40,001"):
        build_datasets(DataConfig(), seq_length=40_000, seed=1, train_samples=None, valid_samples=None,
                       cache_dir=default_build.cache)


def test_bad_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"data.paths=.*nope.txt.*file not found"):
        _build(DataConfig(paths=[str(tmp_path / "nope.txt")]), tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=r"data.paths=.*empty.txt.*the file is empty"):
        _build(DataConfig(paths=[str(tmp_path / "empty.txt")]), tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n   \n" * 20)
    with pytest.raises(ConfigError, match=r"data.paths=.*blank.txt.*has no documents"):
        _build(DataConfig(paths=[str(tmp_path / "blank.txt")]), tmp_path)
    with pytest.raises(ConfigError, match=r"data.paths=.*data.csv.*unknown format"):
        (tmp_path / "data.csv").write_text("a,b\n")
        _build(DataConfig(paths=[str(tmp_path / "data.csv")]), tmp_path)


def test_bad_jsonl(tmp_path):
    good = [json.dumps({"text": f"document number {i}\n"}) for i in range(30)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good[:2] + [json.dumps({"body": "x"})] + good[2:]) + "\n")
    with pytest.raises(ConfigError, match=r"data.paths=.*bad.jsonl.*line 3: record has no 'text' field"):
        _build(DataConfig(paths=[str(path)], vocab_size=300), tmp_path)
    path.write_text("\n".join(good + ["{not json"]) + "\n")
    with pytest.raises(ConfigError, match=r"line 31 is not valid JSON"):
        _build(DataConfig(paths=[str(path)], vocab_size=300), tmp_path)


def test_bad_prefixes(tmp_path):
    with pytest.raises(ConfigError, match=r"data.paths=.*nothere.*nothere.bin and .*nothere.idx are missing"):
        _build(DataConfig(paths=[str(tmp_path / "nothere")], tokenizer=None), tmp_path)
    (tmp_path / "half.bin").write_bytes(b"\0\0")
    with pytest.raises(ConfigError, match=r"half.idx is missing"):
        _build(DataConfig(paths=[str(tmp_path / "half")]), tmp_path)
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "empty.idx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data.paths=.*empty.*the prefix is empty"):
        _build(DataConfig(paths=[str(tmp_path / "empty")]), tmp_path)
    with pytest.raises(ConfigError, match=r"give the prefix without .bin"):
        _build(DataConfig(paths=[str(tmp_path / "half.bin")]), tmp_path)
    with pytest.raises(ConfigError, match=r"data.valid_paths=.*v.txt.*prebuilt megatron prefixes"):
        _build(DataConfig(valid_paths=[str(tmp_path / "v.txt")]), tmp_path)


def test_prefix_only_needs_tokenizer(default_build, tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer=None: data.paths holds only prebuilt megatron prefixes"):
        _build(DataConfig(paths=[default_build.prep.train[0].prefix]), tmp_path)


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*missing.json.*file not found"):
        _build(DataConfig(tokenizer=str(tmp_path / "missing.json")), tmp_path)
    (tmp_path / "garbage.json").write_text("{ this is not a tokenizer")
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*garbage.json.*cannot load"):
        _build(DataConfig(tokenizer=str(tmp_path / "garbage.json")), tmp_path)


def test_bad_weights_fraction_vocab(tmp_path):
    txt = _small_txt(tmp_path, 0, 300)
    with pytest.raises(ConfigError, match=r"data.weights=\[1.0\]: give one weight per path: 2 for 2 data.paths"):
        _build(DataConfig(paths=[txt, txt], weights=[1.0]), tmp_path)
    with pytest.raises(ConfigError,
                       match=r"data.weights=\[1.0, 2.0\]: give one weight per path: 1 for the bundled corpus"):
        _build(DataConfig(weights=[1.0, 2.0]), tmp_path)
    with pytest.raises(ConfigError, match=r"data.weights=.*positive"):
        _build(DataConfig(paths=[txt, txt], weights=[1.0, 0.0]), tmp_path)
    with pytest.raises(ConfigError, match=r"data.valid_fraction=1.5"):
        _build(DataConfig(paths=[txt], valid_fraction=1.5), tmp_path)
    with pytest.raises(ConfigError, match=r"data.vocab_size=100: a byte-level BPE needs at least 257"):
        _build(DataConfig(paths=[txt], vocab_size=100), tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one\ntwo\nthree\n")
    with pytest.raises(ConfigError,
                       match=r"data.valid_fraction=0.1: .*tiny.txt has 3 lines: the validation part is empty"):
        _build(DataConfig(paths=[str(tiny)], vocab_size=300), tmp_path)


# ------------------------------------------------------------------------------------------------
# resumable sampler
# ------------------------------------------------------------------------------------------------
def test_micro_batches_resume_equals_unbroken_run(default_build):
    from attnres_train.data.loader import MicroBatches

    ds = default_build.train
    for rank in range(2):
        mb = MicroBatches(ds, micro_batch_size=2, num_micro=2, dp_rank=rank, dp_size=2)
        # step k's batches depend only on k: a resumed run sees exactly the unbroken run's data
        for step in (0, 3, 7):
            batches = mb.for_step(step)
            assert len(batches) == 2 and batches[0]["tokens"].shape == (2, SEQ)
            idx = batch_indices(step * 8, 8, rank, 2, 2)
            assert torch.equal(torch.cat([b["tokens"] for b in batches]), collate([ds[i] for i in idx])["tokens"])


def test_micro_batches_take_the_same_samples_on_any_data_parallel_size(default_build):
    """The data position is the samples consumed: at any position, the ranks of DP=2 or DP=4 (any
    micro-batch size) together take exactly the samples DP=1 takes, so a run resumed on another
    DP size trains on the samples an unbroken run would have (wrapping past the dataset's end)."""
    from attnres_train.data.loader import MicroBatches

    ds = default_build.train
    for consumed in (0, 24, len(ds) - 4):
        one = MicroBatches(ds, micro_batch_size=2, num_micro=4, dp_rank=0, dp_size=1).indices(consumed)
        assert one == [(consumed + i) % len(ds) for i in range(8)]
        for dp, mbs in ((2, 2), (2, 4), (4, 1), (4, 2)):
            ranks = [MicroBatches(ds, micro_batch_size=mbs, num_micro=8 // (mbs * dp), dp_rank=r, dp_size=dp)
                     for r in range(dp)]
            assert all(mb.global_batch_size == 8 for mb in ranks)
            assert sorted(i for mb in ranks for i in mb.indices(consumed)) == sorted(one)


def test_sampler_ranks_partition_global_batch():
    for gbs, mbs, dp in ((16, 2, 2), (12, 3, 2), (8, 4, 2), (8, None, 2), (6, 1, 3)):
        for consumed in (0, gbs, 5 * gbs):
            slices = [batch_indices(consumed, gbs, r, dp, mbs) for r in range(dp)]
            assert sorted(sum(slices, [])) == list(range(consumed, consumed + gbs))
            assert all(len(s) == gbs // dp for s in slices)
    # Megatron-LM order: micro-batch groups of mbs * dp, rank r takes slice r of each group
    assert batch_indices(32, 16, 1, 2, 4) == [36, 37, 38, 39, 44, 45, 46, 47]
    with pytest.raises(ValueError):
        batch_indices(0, 10, 0, 4, 2)


# ------------------------------------------------------------------------------------------------
# two ranks (gloo): rank 0 prepares, the other rank reuses its cache; identical datasets
# ------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, world, port, txt, jsonl, cache, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = DataConfig(paths=[txt, jsonl], weights=[0.5, 0.5], vocab_size=SMALL_VOCAB)
        prep = prepare_data(cfg, cache_dir=cache)
        train, valid, tok = build_datasets(cfg, seq_length=32, seed=3, train_samples=64, valid_samples=8,
                                           cache_dir=cache)
        res = {
            "trained": prep.tokenizer_info["trained"],
            "sha": tok.sha256,
            "train": [train[i]["tokens"].tolist() for i in (0, 17, 63)],
            "valid": [valid[i]["tokens"].tolist() for i in range(len(valid))],
            "slice": batch_indices(16, 16, rank, world, 4),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_cache(tmp_path):
    import torch.multiprocessing as mp

    from parallel.groups import free_port

    port = free_port()
    txt = _small_txt(tmp_path, 0, 1000)
    jsonl, _ = _small_jsonl(tmp_path, 30_000, 31_000)
    # fork: the children inherit the imported megatron (spawn re-imports it: ~4 s per process), unless
    # this process holds a process group (another test's), which a forked child would inherit
    method = "spawn" if torch.distributed.is_initialized() else "fork"
    mp.start_processes(_two_rank_worker, args=(2, port, txt, jsonl, str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
                       join=True, start_method=method)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the first prepare_data call trained on rank 0 only; rank 1 waited at the barrier and loaded it
    assert (r0["trained"], r1["trained"]) == (True, False)
    assert r0["sha"] == r1["sha"] and r0["train"] == r1["train"] and r0["valid"] == r1["valid"]
    assert sorted(r0["slice"] + r1["slice"]) == list(range(16, 32))
    assert not [p for p in (tmp_path / "cache" / "indexed").iterdir() if p.name.startswith(".tmp")]
