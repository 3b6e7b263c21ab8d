"""wq.calib.distributed: sample shares and the one-process identities."""

import pytest
import torch

from wq.calib.distributed import all_reduce_grads_, all_reduce_scalar, all_reduce_sum_, rank_world, share


@pytest.mark.parametrize("n,world", [(0, 1), (7, 1), (7, 2), (8, 2), (5, 3), (2, 4), (128, 8)])
def test_shares_partition_the_samples(n, world):
    parts = [share(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))  # contiguous, in order, nothing twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_is_identity():
    assert rank_world() == (0, 1)
    assert share(5) == range(5)
    t = torch.arange(4.0)
    assert all_reduce_sum_(t) is t and t.tolist() == [0, 1, 2, 3]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_grads_([p])
    assert p.grad.tolist() == [2, 2, 2]
    assert all_reduce_scalar(1.5) == 1.5
