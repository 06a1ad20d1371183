import torch

from attnres_train import cpu_compat


def test_rng_tracker_forks_cpu_streams(mcore_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    if not cpu_compat.needed():
        return
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    # The default stream is untouched by the fork, and the named stream advances.
    assert torch.equal(before, torch.get_rng_state())
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)
