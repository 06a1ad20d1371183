"""The training loop's named steps, in process: cadence, throughput, and a TrainState through a
checkpoint (save -> load into a fresh state restores weights, optimizer, schedule and position)."""

from __future__ import annotations

import json
import math

import torch

from attnres_train import checkpoint
from attnres_train.config.schema import ParallelConfig, TrainConfig
from attnres_train.optim import build_optimizer, build_scheduler, torch_adams, wrap_chunks
from attnres_train.train import Cadence, Throughput, build_chunks
from attnres_train.train_state import TrainState
from tests.helpers import tiny_model_cfg


def _cadence(**kw) -> Cadence:
    base = dict(total=10, start=0, log_interval=4, eval_interval=5, save_interval=3, diag_interval=0)
    return Cadence(**{**base, **kw})


def test_cadence_every_interval_and_the_last_step():
    c = _cadence()
    assert [d for d in range(1, 11) if c.logs(d)] == [1, 4, 8, 10]  # the first step of a start logs
    assert [d for d in range(1, 11) if c.evaluates(d)] == [5, 10]
    assert [d for d in range(1, 11) if c.saves(d)] == [3, 6, 9, 10]
    assert not any(c.draws_diagnostics(d) for d in range(1, 11))  # diag_interval=0: never
    assert not any(c.exits(d) for d in range(1, 11))  # exit_interval=0: never
    # train.exit_interval stops at its multiples, but never at the last step (that one finishes)
    assert [d for d in range(1, 11) if _cadence(exit_interval=5).exits(d)] == [5]
    assert [d for d in range(1, 11) if _cadence(exit_interval=4).exits(d)] == [4, 8]


def test_cadence_zero_intervals_mean_only_at_the_end_and_a_restart_logs_its_first_step():
    c = _cadence(start=6, eval_interval=0, save_interval=0, diag_interval=4)
    assert [d for d in range(7, 11) if c.logs(d)] == [7, 8, 10]
    assert [d for d in range(7, 11) if c.evaluates(d)] == [10]
    assert [d for d in range(7, 11) if c.saves(d)] == [10]
    assert [d for d in range(7, 11) if c.draws_diagnostics(d)] == [8, 10]


def test_throughput_averages_the_steps_since_the_last_record():
    meter = Throughput(tokens_per_step=1000, flops_per_token=6e6, peak_flops=1e12, world_size=2)
    for seconds in (0.5, 1.5):
        meter.add(seconds)
    assert meter.take(done=3) == {"tokens": 3000, "tokens_per_s": 1000.0, "step_time_s": 1.0,
                                  "mfu": 6e6 * 1000 / 1.0 / 2e12}
    assert meter.times == []


def _state(model_cfg, train_cfg) -> TrainState:
    (chunk,) = build_chunks(model_cfg, ParallelConfig(), torch.float32)
    (ddp,) = wrap_chunks([chunk])
    chunk.config.no_sync_func = ddp.no_sync
    optimizer = build_optimizer(train_cfg, [ddp], params_dtype=torch.float32)
    return TrainState([chunk], optimizer, build_scheduler(train_cfg, optimizer))


def test_train_state_round_trips_through_a_checkpoint(mcore_world, tmp_path):
    model_cfg, train_cfg = tiny_model_cfg(), TrainConfig(steps=8, warmup_steps=2, global_batch_size=4)
    saved = _state(model_cfg, train_cfg)
    for p in saved.model_chunks[0].parameters():  # an update, so that the optimizer holds moments
        p.main_grad.fill_(0.01)
    saved.optimizer.step()
    saved.scheduler.step(increment=1)
    for _ in range(3):
        saved.finish_step(train_cfg.global_batch_size)
    assert (saved.step, saved.consumed_samples) == (3, 12)
    path = checkpoint.save(tmp_path, saved, model_cfg=model_cfg, keep_last=2)
    meta = json.loads((path / checkpoint.META).read_text())
    assert path.name == "step_0000003" and (meta["step"], meta["consumed_samples"]) == (3, 12)

    torch.manual_seed(99)  # other initial weights
    fresh = _state(model_cfg, train_cfg)
    assert checkpoint.resume("none", tmp_path, fresh, model_cfg) is None and fresh.step == 0
    assert checkpoint.resume("auto", tmp_path, fresh, model_cfg, log=lambda *_: None)["step"] == 3
    assert (fresh.step, fresh.consumed_samples) == (3, 12)
    want, got = saved.model_chunks[0].state_dict(), fresh.model_chunks[0].state_dict()
    names = [n for n, _ in saved.model_chunks[0].named_parameters()]
    assert names and all(torch.equal(got[n], want[n]) for n in names)
    assert fresh.scheduler.num_steps == saved.scheduler.num_steps == 1
    assert math.isclose(fresh.optimizer.param_groups[0]["lr"], saved.optimizer.param_groups[0]["lr"])
    want, got = _adam_state(saved), _adam_state(fresh)
    assert want and all(exp_avg.abs().sum() > 0 for _, exp_avg, _ in want)  # moments were saved
    assert len(got) == len(want)
    for (step, exp_avg, exp_avg_sq), (step_0, exp_avg_0, exp_avg_sq_0) in zip(got, want):
        assert step.item() == step_0.item() == 1
        assert torch.equal(exp_avg, exp_avg_0) and torch.equal(exp_avg_sq, exp_avg_sq_0)
    # one step tensor per parameter: Adam advances each in place
    assert len({id(step) for step, _, _ in got}) == len(got)


def _adam_state(state: TrainState) -> list:
    """(step, exp_avg, exp_avg_sq) of every parameter shard the optimizer updates, in order."""
    return [(adam.state[p]["step"], adam.state[p]["exp_avg"], adam.state[p]["exp_avg_sq"])
            for adam in torch_adams(state.optimizer) for group in adam.param_groups for p in group["params"]]


