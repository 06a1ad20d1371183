"""Training-dynamics diagnostics (the paper's figures), for baseline and AttnRes runs alike.

Per sublayer l (attention and FFN alternate; index 2·layer + {0, 1}):
  - output RMS of f_l(h_l), the sublayer's raw output;
  - gradient norm of the loss w.r.t. that output;
  - AttnRes only: the depth-attention map, the mean softmax weight of sublayer l over its sources
    (embedding, block summaries, partial sum), plus the final aggregate as the last row.
Recorded on one training step every `logging.diag_interval` steps; appended to diagnostics.jsonl
and drawn as diagnostics/step_XXXXXXX.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnres_train.model.structure import layer_index, sublayer_index


@torch.no_grad()
def depth_weights(sources, query, gamma, eps) -> list:
    """Mean over tokens of softmax_j((query⊙gamma)·RMSNorm(source_j)); sources: k × [S, B, D]."""
    w = (query.float() * gamma.float())
    logits = torch.stack([(s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)) @ w
                          for s in sources])  # [k, S, B]
    return torch.softmax(logits, dim=0).mean(dim=(1, 2)).tolist()


class Diagnostics:
    def __init__(self, model_chunks: list, run_dir: Path):
        """model_chunks: this rank's (unwrapped) model chunks; under pipeline parallelism the
        diagnostics cover the sublayers this rank holds."""
        self.run_dir = run_dir
        self.active = False
        self.out_rms: dict = {}
        self.grad_norm: dict = {}
        self.weights: dict = {}
        for model in model_chunks:
            for layer in model.decoder.layers:
                i = layer_index(layer)
                layer.self_attention.register_forward_hook(self._hook(sublayer_index(i, ffn=False)))
                layer.mlp.register_forward_hook(self._hook(sublayer_index(i, ffn=True)))
            if hasattr(model.decoder, "mix_observer"):
                model.decoder.mix_observer = self._observe_mix

    def _hook(self, index: int):
        def hook(module, args, output):
            if not self.active:
                return
            out = output[0] if isinstance(output, tuple) else output
            self.out_rms[index] = out.detach().float().pow(2).mean().sqrt().item()
            if out.requires_grad:
                out.register_hook(lambda g: self.grad_norm.__setitem__(index, g.float().norm().item()))

        return hook

    def _observe_mix(self, index, sources, q):
        if self.active:
            self.weights[index] = depth_weights(sources, q.query, q.key_norm_weight, q.eps)

    def start(self) -> None:
        self.active = True
        self.out_rms, self.grad_norm, self.weights = {}, {}, {}

    def finish(self, step: int) -> dict:
        self.active = False
        record = {"step": step,
                  "output_rms": [self.out_rms[k] for k in sorted(self.out_rms)],
                  "grad_norm": [self.grad_norm.get(k) for k in sorted(self.out_rms)],
                  "depth_weights": [self.weights[k] for k in sorted(self.weights)]}
        with open(self.run_dir / "diagnostics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.plot(record)
        return record

    def plot(self, record: dict) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = self.run_dir / "diagnostics"
        out_dir.mkdir(exist_ok=True)
        panels = 3 if record["depth_weights"] else 2
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
        x = list(range(len(record["output_rms"])))
        axes[0].plot(x, record["output_rms"], marker="o")
        axes[0].set(title="sublayer output RMS", xlabel="sublayer", yscale="log")
        axes[1].plot(x, [g if g is not None else float("nan") for g in record["grad_norm"]], marker="o")
        axes[1].set(title="gradient norm of sublayer output", xlabel="sublayer", yscale="log")
        if record["depth_weights"]:
            rows = record["depth_weights"]
            width = max(len(r) for r in rows)
            grid = torch.full((len(rows), width), float("nan"))
            for i, r in enumerate(rows):
                grid[i, :len(r)] = torch.tensor(r)
            im = axes[2].imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
            axes[2].set(title="depth attention (mean weight)", xlabel="source (0 = embedding)",
                        ylabel="sublayer (last row: final)")
            fig.colorbar(im, ax=axes[2])
        fig.suptitle(f"step {record['step']}")
        fig.tight_layout()
        path = out_dir / f"step_{record['step']:07d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
