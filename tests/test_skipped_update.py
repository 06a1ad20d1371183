"""A step with a non-finite gradient skips its update, in process: one injected NaN gradient (a
tensor hook) leaves the run on the same trajectory as a run that simply did not update on that
batch; finite steps are untouched; the finiteness check sees what a checkpoint would write."""

from __future__ import annotations

import pytest
import torch

from attnres_train.config.schema import ParallelConfig, TrainConfig
from attnres_train.errors import TrainingDiverged
from attnres_train.optim import build_optimizer, build_scheduler, wrap_chunks
from attnres_train.step import all_finite, grad_buffers, model_state_tensors, train_step
from attnres_train.train import Divergence, build_chunks
from attnres_train.train_state import TrainState
from parallel.layout import layout_for
from parallel.pipeline import Pipeline
from tests.helpers import tiny_model_cfg

STEPS, BAD_STEP, MICRO, MBS = 5, 2, 2, 2


def _batches(cfg, step: int) -> list:
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(MICRO):
        tokens = torch.randint(0, cfg.vocab_size, (MBS, cfg.seq_length + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MBS, cfg.seq_length),
                    "position_ids": torch.arange(cfg.seq_length).expand(MBS, -1)})
    return out


def _run(model_cfg, *, inject_nan: bool, skip_by_hand: bool):
    """Losses, update_ok flags and final weights of STEPS steps from the same initial weights."""
    torch.manual_seed(1234)
    train_cfg = TrainConfig(steps=STEPS, warmup_steps=1, global_batch_size=MICRO * MBS, micro_batch_size=MBS)
    (chunk,) = build_chunks(model_cfg, ParallelConfig(), torch.float32)
    (ddp,) = wrap_chunks([chunk])
    chunk.config.no_sync_func = ddp.no_sync
    optimizer = build_optimizer(train_cfg, [ddp], params_dtype=torch.float32)
    scheduler = build_scheduler(train_cfg, optimizer)
    pipeline = Pipeline([ddp], layout_for(model_cfg, ParallelConfig()), seq_length=model_cfg.seq_length,
                        micro_batch_size=MBS)
    losses, oks = [], []
    for step in range(STEPS):
        batches = _batches(model_cfg, step)
        if step == BAD_STEP and skip_by_hand:  # the reference: forward + backward, no update
            for c in pipeline.chunks:
                c.zero_grad_buffer()
            out = pipeline.run(batches)
            losses.append(sum(d["lm loss"].item() for d in out) / len(out))
            oks.append(False)
            continue
        hook = None
        if step == BAD_STEP and inject_nan:
            weight = chunk.decoder.layers[1].mlp.router.weight  # one parameter's gradient only
            hook = weight.register_hook(lambda g: g * float("nan"))
        result = train_step(pipeline, optimizer, scheduler, batches)
        if hook is not None:
            hook.remove()
        losses.append(result["loss"])
        oks.append(result["update_ok"])
    weights = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    return losses, oks, weights, (chunk, optimizer, ddp)


def test_one_nan_gradient_skips_that_update_and_training_goes_on(mcore_world):
    cfg = tiny_model_cfg()
    losses, oks, weights, (chunk, optimizer, ddp) = _run(cfg, inject_nan=True, skip_by_hand=False)
    assert oks == [i != BAD_STEP for i in range(STEPS)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the skipped step left NaN in the gradient buffer but none in what a checkpoint writes
    assert all_finite(model_state_tensors([chunk], optimizer))

    ref_losses, _, ref_weights, _ = _run(cfg, inject_nan=False, skip_by_hand=True)
    assert losses == ref_losses  # bit for bit: the skipped update changed nothing else
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)

    plain, plain_oks, _, _ = _run(cfg, inject_nan=False, skip_by_hand=False)
    assert all(plain_oks) and plain[:BAD_STEP + 1] == losses[:BAD_STEP + 1]
    assert plain[BAD_STEP + 1:] != losses[BAD_STEP + 1:]  # an update was really skipped


def test_a_non_finite_state_is_never_checkpointed(mcore_world, tmp_path):
    _, _, _, (chunk, optimizer, _) = _run(tiny_model_cfg(), inject_nan=False, skip_by_hand=False)
    state = TrainState([chunk], optimizer, scheduler=None, step=STEPS)
    guard = Divergence(TrainConfig(), tmp_path)
    guard.check_checkpointable(state)  # finite: no objection
    moment = next(v["exp_avg"] for v in optimizer.optimizer.state.values())
    moment.view(-1)[0] = float("inf")  # one optimizer moment, not a weight
    with pytest.raises(TrainingDiverged, match=rf"step {STEPS}: the parameters or optimizer moments are not "
                                               r"finite, so no checkpoint is written\. There is no checkpoint yet"):
        guard.check_checkpointable(state)


def test_all_finite_sees_one_bad_element(mcore_world):
    good = [torch.ones(3), torch.zeros(2, 2)]
    assert all_finite(good) and not all_finite(good, extra=float("nan"))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(4)
        t[2] = bad
        assert not all_finite(good + [t])
    assert grad_buffers([]) == []
