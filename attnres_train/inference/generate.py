"""attnres-train-generate: sample from a checkpoint with transformers' generation.

    attnres-train-generate RUN_DIR_OR_CHECKPOINT --prompt "To be" [--prompt ...]
        [--prompt-file FILE|-] [--max-new-tokens 64] [--temperature 1.0] [--top-k 0] [--top-p 1.0]
        [--seed 0] [--num-samples 1] [--dtype float32]

Prompts: every --prompt, then every non-empty line of --prompt-file ("-": stdin); with neither,
stdin's lines. An empty prompt starts from the end-of-document token (unconditional samples).
Text streams to stdout as it is produced; with more than one prompt or sample each output starts
with a `### prompt P, sample S` line. --temperature 0 decodes greedily. Sample s of every prompt
draws from torch's generator seeded with --seed + s, so a command gives the same text every time
(on the same machine and library versions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch

from attnres_train.convert.cli import DTYPES, one_process


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnres-train-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a checkpoint dir, or a run dir (its newest checkpoint)")
    ap.add_argument("--prompt", action="append", default=[], help="repeatable")
    ap.add_argument("--prompt-file", default=None, help="one prompt per line; - for stdin")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the run's (or the import's)")
    return ap


def read_prompts(args) -> List[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        prompts += [line for line in text.splitlines() if line.strip()]
    elif not prompts:
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    return prompts


def generation_kwargs(args) -> dict:
    """transformers' generate arguments for the sampling flags."""
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k or None, "top_p": args.top_p}


def generate(loaded, prompt: str, *, max_new_tokens: int, seed: int, stream=None, **kwargs) -> torch.Tensor:
    """Token ids [1, prompt + new] of one sample; text goes to `stream` (a transformers
    streamer) as it is produced."""
    tok, model = loaded.tokenizer, loaded.model
    ids = tok(prompt, return_tensors="pt")["input_ids"] if prompt else torch.tensor([[tok.eos_token_id]])
    ids = ids.to(model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              pad_token_id=tok.pad_token_id, streamer=stream, **kwargs)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    for name, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--num-samples", args.num_samples, args.num_samples >= 1),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1)):
        if not ok:
            _fail(f"{name}={value}: out of range")
    try:
        prompts = read_prompts(args)
        if not prompts:
            _fail("no prompt: give --prompt, --prompt-file or lines on stdin")
        one_process()
        from transformers import TextStreamer

        from attnres_train.inference.hf_model import load

        loaded = load(args.checkpoint, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer)
        if loaded.tokenizer is None:
            _fail(f"{loaded.checkpoint} has no tokenizer (no run tokenizer.json next to it): pass --tokenizer")
    except FileNotFoundError as exc:
        _fail(str(exc))
    stream = TextStreamer(loaded.tokenizer)
    many = len(prompts) * args.num_samples > 1
    for p, prompt in enumerate(prompts, start=1):
        for s in range(args.num_samples):
            if many:
                print(f"### prompt {p}, sample {s + 1}", flush=True)
            generate(loaded, prompt, max_new_tokens=args.max_new_tokens, seed=args.seed + s, stream=stream,
                     **generation_kwargs(args))
            sys.stdout.flush()


def _fail(message: str) -> None:
    print(f"attnres-train-generate: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
