"""recon: learned block reconstruction beats autoround's block loss at equal steps, starts exactly at its
initializer, survives Linears that see no token, and gives the same result across torchrun ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_blocks import block_mse, linears, result_weights, tiny_block

from wq.algorithms import ALGORITHMS
from wq.algorithms.autoround import autoround_block
from wq.algorithms.recon import initial_results, recon_block
from wq.scheme import QuantScheme


@pytest.mark.parametrize("scheme", ["W2G128", "W3G128", "W4G128", "W4G-1"])
def test_block_loss_below_autoround_at_equal_steps(scheme):
    block, inputs, kwargs, targets = tiny_block()
    plan = dict.fromkeys(linears(block), QuantScheme.parse(scheme))
    before = {k: v.clone() for k, v in block.state_dict().items()}
    rec = recon_block(block, plan, inputs, kwargs, targets, iters=30)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items()), "block weights were modified"
    ar = autoround_block(block, plan, inputs, kwargs, targets, iters=30, batch_size=1, lr=0.02)
    e_rec = block_mse(block, result_weights(rec), inputs, kwargs, targets)
    e_ar = block_mse(block, result_weights(ar), inputs, kwargs, targets)
    assert e_rec < 0.9 * e_ar, (scheme, e_rec, e_ar)
    stats = next(iter(rec.values())).stats
    assert stats["loss"] < stats["init_loss"] and stats["steps"] > 0


@pytest.mark.parametrize("init", ["rtn", "gptq", "autoround"])
def test_zero_steps_reproduce_the_initializer(init):
    """Training starts exactly at the initializer's codes, scales and zero points."""
    block, inputs, kwargs, targets = tiny_block(hidden=96, inter=160)
    plan = dict.fromkeys(linears(block), QuantScheme.parse("W3G32"))
    ref = initial_results(block, plan, inputs, kwargs, targets, init, mse=True, init_iters=5)
    got = recon_block(block, plan, inputs, kwargs, targets, init_results=copy.deepcopy(ref), iters=0)
    for n in plan:
        assert torch.equal(got[n].packed.qweight, ref[n].packed.qweight), n
        assert torch.equal(got[n].packed.scales, ref[n].packed.scales) and torch.equal(got[n].packed.zeros,
                                                                                        ref[n].packed.zeros)


def test_training_improves_on_each_initializer():
    block, inputs, kwargs, targets = tiny_block(hidden=96, inter=160)
    plan = dict.fromkeys(linears(block), QuantScheme.parse("W2G32"))
    for init in ("rtn", "gptq", "autoround"):
        ref = initial_results(block, plan, inputs, kwargs, targets, init, mse=True, init_iters=10, batch_size=1)
        got = recon_block(block, plan, inputs, kwargs, targets, init_results=ref, iters=20)
        e_ref = block_mse(block, result_weights(ref), inputs, kwargs, targets)
        e_got = block_mse(block, result_weights(got), inputs, kwargs, targets)
        assert e_got < 0.9 * e_ref, (init, e_got, e_ref)


class _Routed(torch.nn.Module):
    """Two 'experts'; the second never gets a token (as an MoE expert nobody routed to)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)

    def forward(self, x, **kw):
        return x + self.a(x) + self.b(x[:, :0]).sum()  # b is called on no token


def test_linear_without_tokens_gets_zero_gradient_and_its_initializer():
    torch.manual_seed(0)
    block = _Routed()
    inputs = [torch.randn(2, 8, 64) for _ in range(3)]
    with torch.no_grad():
        targets = [block(x) for x in inputs]
    plan = dict.fromkeys(["a", "b"], QuantScheme.parse("W3G32"))
    ref = initial_results(block, plan, inputs, [{}] * 3, targets, "rtn", mse=True)
    got = recon_block(block, plan, inputs, [{}] * 3, targets, iters=10)
    assert torch.equal(got["b"].packed.qweight, ref["b"].packed.qweight)  # untouched: no gradient reached it
    assert not torch.equal(got["a"].packed.qweight, ref["a"].packed.qweight)


def test_registered_end_to_end_on_tiny_model(tiny_model):
    from wq import quantize_model
    from wq.nn import QuantLinear

    cls = ALGORITHMS.get("recon")
    assert cls.needs_calibration and cls.granularity == "block"
    model = tiny_model.float()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(test).logits
    rec, rtn = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(rec, "W2G32", algo="recon", calib=calib, nsamples=8, seqlen=32, iters=30, progress=False)
    quantize_model(rtn, "W2G32", algo="rtn", progress=False)
    assert any(isinstance(m, QuantLinear) for m in rec.modules())
    with torch.no_grad():
        e_rec = (rec(test).logits - ref).pow(2).mean()
        e_rtn = (rtn(test).logits - ref).pow(2).mean()
    assert e_rec < 0.8 * e_rtn, (float(e_rec), float(e_rtn))


def _rank(rank: int, world: int, store: str, q) -> None:
    import torch.distributed as dist

    from wq.calib.distributed import share

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        block, inputs, kwargs, targets = tiny_block(hidden=64, inter=96, batches=3, batch=2)
        xs = [x[i:i + 1] for x in inputs for i in range(x.shape[0])]  # 6 samples, split as the pipeline will
        ys = [y[i:i + 1] for y in targets for i in range(y.shape[0])]
        mine = share(len(xs), rank, world)
        plan = dict.fromkeys(linears(block), QuantScheme.parse("W3G32"))
        res = recon_block(block, plan, [xs[i] for i in mine], [kwargs[0]] * len(mine), [ys[i] for i in mine],
                          iters=8, init="gptq")
        if rank == 0:
            # numpy arrays pickle by value: a torch tensor would travel as a shared-memory fd that the parent
            # can no longer fetch once this process has exited
            q.put({n: r.packed.dequantize().numpy() for n, r in res.items()})
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    """Samples split over 2 gloo ranks (contiguous shares): the same weights as one process. With one
    sample per step the summed gradients are exact (one rank adds zeros); the Hessians of the gptq
    start and the check losses are float sums in another order: equal to 1e-5."""
    import torch.multiprocessing as mp

    block, inputs, kwargs, targets = tiny_block(hidden=64, inter=96, batches=3, batch=2)
    plan = dict.fromkeys(linears(block), QuantScheme.parse("W3G32"))
    xs = [x[i:i + 1] for x in inputs for i in range(x.shape[0])]
    ys = [y[i:i + 1] for y in targets for i in range(y.shape[0])]
    one = recon_block(block, plan, xs, [kwargs[0]] * len(xs), ys, iters=8, init="gptq")
    ctx = mp.get_context("fork")  # no re-import in the children: seconds instead of a minute
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "store"), q)) for r in range(2)]
    for p in procs:
        p.start()
    two = {n: torch.from_numpy(a) for n, a in q.get(timeout=300).items()}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for n, r in one.items():
        torch.testing.assert_close(two[n], r.packed.dequantize(), rtol=1e-5, atol=1e-5)
