"""Data-parallel training: 2 gloo processes on 127.0.0.1 under
DistributedDataParallel against one process on the concatenated batch.

With ``free_bits_group`` the batch free-bits clamp sees the global batch's
per-dimension mean, so after DDP averages the gradients every parameter
gradient equals the single-process one; per-sample free bits and plain
batchmean need no group. ELBOLoss's step buffer survives DDP's buffer
broadcast.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import klanneal
from klanneal.nn import ELBOLoss
from klanneal.schedules import Monotonic

WORLD = 2
BATCH = 8  # global batch; each rank takes BATCH // WORLD consecutive rows
T, V, H, D = 3, 11, 16, 6

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


class _Vae(nn.Module):
    """A tiny text VAE whose loss module (with its step buffer) DDP wraps too."""

    def __init__(self, criterion: ELBOLoss) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.enc = nn.Linear(H, 2 * D)
        self.dec = nn.Linear(D + H, V)
        self.criterion = criterion

    def forward(self, tokens: torch.Tensor) -> klanneal.ELBOOutput:
        h = self.embed(tokens)  # [B, T, H]
        mu, logvar = self.enc(h.mean(dim=1)).chunk(2, dim=1)
        z = mu  # deterministic: the test compares gradients exactly
        dec_in = torch.cat([z.unsqueeze(1).expand(-1, T, -1), h], dim=-1)
        return self.criterion(self.dec(dec_in), tokens, mu, logvar)


def _data() -> torch.Tensor:
    return torch.randint(0, V, (BATCH, T), generator=torch.Generator().manual_seed(5))


def _model(free_bits: float, mode: str, group) -> _Vae:
    torch.manual_seed(0)
    criterion = ELBOLoss(
        schedule=Monotonic(warmup_steps=4, start=0.2), free_bits=free_bits, free_bits_mode=mode,
        free_bits_group=group,
    )  # fmt: skip
    return _Vae(criterion).double()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _lambda_that_splits_ranks() -> float:
    """A free-bits lambda for which rank 0's local batch-mean decision differs
    from the global one in some dimension (so the test can fail)."""
    model = _model(0.0, "batch", None)
    tokens = _data()
    with torch.no_grad():
        h = model.embed(tokens)
        mu, logvar = model.enc(h.mean(dim=1)).chunk(2, dim=1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    global_mean, local = kl.mean(0), kl[: BATCH // WORLD].mean(0)
    d = int((local - global_mean).abs().argmax())
    return float((local[d] + global_mean[d]) / 2)


def _single_process(free_bits: float, mode: str, steps: int) -> list[dict[str, torch.Tensor]]:
    model = _model(free_bits, mode, None)
    tokens = _data()
    out = []
    for _ in range(steps):
        model.zero_grad()
        model(tokens).loss.backward()
        out.append(_grads(model))
        model.criterion.step()
    return out


def _worker(rank: int, port: int, configs: list, steps: int, out_dir: str) -> None:
    """Trains each (free_bits, mode, use_group) config under DDP for `steps` steps."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        torch.set_num_threads(1)
        results = []
        for free_bits, mode, use_group in configs:
            model = _model(free_bits, mode, "world" if use_group else None)
            ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
            rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            tokens = _data()[rows]
            grads, steps_seen = [], []
            for _ in range(steps):
                ddp.zero_grad()
                ddp(tokens).loss.backward()
                grads.append(_grads(model))
                steps_seen.append(int(model.criterion.current_step))
                model.criterion.step()
            results.append({"grads": grads, "steps": steps_seen})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_grads_equal(got: dict, want: dict) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_ddp_gradients_equal_one_process_on_the_global_batch(tmp_path):
    """batchmean, batch free bits with the group, sample free bits; and the
    check can fail: batch free bits without the group differs."""
    split = _lambda_that_splits_ranks()
    configs = [(0.0, "batch", False), (split, "batch", True), (0.3, "sample", False),
               (split, "batch", False)]  # fmt: skip
    steps = 3
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(_free_port(), configs, steps, str(tmp_path)), nprocs=WORLD,
             join=True)  # fmt: skip
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for c, (free_bits, mode, use_group) in enumerate(configs):
        want = _single_process(free_bits, mode, steps)
        for rank in range(WORLD):
            got = results[rank][c]
            # The step buffer survives DDP's broadcast of rank 0's buffers.
            assert got["steps"] == list(range(steps))
            if mode == "batch" and free_bits > 0 and not use_group:
                # Each rank clamped its own batch mean: not the global objective.
                assert any(
                    not torch.allclose(got["grads"][0][n], want[0][n], rtol=1e-9, atol=1e-12)
                    for n in want[0]
                )
                continue
            for step in range(steps):
                _assert_grads_equal(got["grads"][step], want[step])


def _rows_worker(rank: int, port: int, out_dir: str) -> None:
    """Each rank's gradient of its own rows, with the group, for the row-level check."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        x, target, mu, logvar, free_bits = _rows_inputs()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        leaves = [t[rows].clone().requires_grad_() for t in (x, mu, logvar)]
        out = klanneal.elbo_loss(leaves[0], target[rows], leaves[1], leaves[2], 0.9,
                                 free_bits=free_bits, free_bits_group="world")  # fmt: skip
        out.loss.backward()
        ref = klanneal.elbo_loss_ref(leaves[0].detach(), target[rows], *(
            t.detach().requires_grad_() for t in leaves[1:]), 0.9, free_bits=free_bits,
            free_bits_group="world")  # fmt: skip
        torch.save({"grads": [t.grad for t in leaves], "loss": out.loss.detach(),
                    "ref_loss": ref.loss.detach()}, Path(out_dir) / f"rows{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _rows_inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, T, V, generator=gen, dtype=torch.float64)
    target = torch.randint(0, V, (BATCH, T), generator=gen)
    mu = torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
    mu[: BATCH // WORLD, 0] *= 4  # rank 0's dimension 0 is far above the global mean
    logvar = 0.3 * torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    free_bits = float((kl[: BATCH // WORLD, 0].mean() + kl[:, 0].mean()) / 2)
    return x, target, mu, logvar, free_bits


def test_each_rank_row_gradient_over_world_is_the_single_process_one(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rows_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x, target, mu, logvar, free_bits = _rows_inputs()
    leaves = [t.clone().requires_grad_() for t in (x, mu, logvar)]
    single = klanneal.elbo_loss(leaves[0], target, leaves[1], leaves[2], 0.9,
                                free_bits=free_bits)  # fmt: skip
    single.loss.backward()
    losses = []
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rows{rank}.pt")
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for g, leaf in zip(got["grads"], leaves):
            torch.testing.assert_close(g / WORLD, leaf.grad[rows], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got["loss"], got["ref_loss"], rtol=1e-10, atol=1e-12)
        losses.append(got["loss"])
    # The ranks' batchmean losses average to the global one.
    torch.testing.assert_close(sum(losses) / WORLD, single.loss.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_process_group_equals_no_group_with_half_latents(tmp_path, dtype):
    # Regression: with fp16/bf16 latents the group's batch mean was computed
    # in that dtype (every step of KL_bd rounded), so one process with the
    # group differed from no group: another loss, and a free-bits mask that
    # let a dimension just below lambda through.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        mu = (0.7 * torch.randn(64, 16, generator=gen)).to(dtype)
        logvar = (0.5 * torch.randn(64, 16, generator=gen)).to(dtype)
        x = torch.randn(64, 3, 7, generator=gen).to(dtype)
        target = torch.randint(0, 7, (64, 3), generator=gen)
        plain = klanneal.elbo_loss(x, target, mu, logvar, reduction="sum")
        free_bits = float(plain.kl_per_dim[0].double()) * (1 + 3e-4)  # just above dim 0's mean
        grads = []
        for group in (None, "world"):
            leaf = mu.clone().requires_grad_()
            out = klanneal.elbo_loss(
                x, target, leaf, logvar, free_bits=free_bits, reduction="sum",
                free_bits_group=group,
            )  # fmt: skip
            out.loss.backward()
            grads.append((out.loss, leaf.grad))
        assert torch.equal(grads[0][0], grads[1][0])
        assert torch.equal(grads[0][1], grads[1][1])
        assert not grads[1][1][:, 0].any()  # dimension 0 is below lambda: no KL gradient
    finally:
        dist.destroy_process_group()
