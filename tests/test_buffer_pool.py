"""The CPU gradient-buffer pool: _C.pooled_empty and its use by elbo_loss."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from elbo_cases import pack_options

import klanneal
from klanneal import _ops, elbo_loss, elbo_loss_ref

_C = pytest.importorskip("klanneal._C")

# A categorical batch whose logits (4 * 8 * 8200 float32, ~1.05 MB) pass the
# pool's 1 MiB threshold.
SHAPE = (4, 8, 8200)


@pytest.fixture(autouse=True)
def _clean_pool(monkeypatch):
    monkeypatch.delenv("KLANNEAL_GRAD_POOL", raising=False)
    klanneal.empty_cache()
    yield
    klanneal.empty_cache()


def _pooled(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.from_dlpack(_C.pooled_empty(list(shape), _ops.DTYPE_CODES[dtype]))


def _nbytes(shape, dtype=torch.float32) -> int:
    """What a cached buffer of this shape counts: its size rounded up to 2 MiB blocks."""
    block = 2 << 20
    return -(-torch.empty(shape, dtype=dtype).nbytes // block) * block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 4, 1), (1,), ()])
def test_pooled_tensor_matches_torch_empty(shape, dtype):
    t = _pooled(shape, dtype)
    ref = torch.empty(shape, dtype=dtype)
    assert t.shape == ref.shape and t.dtype == dtype and t.device.type == "cpu"
    assert t.stride() == ref.stride() and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0
    values = torch.arange(t.numel(), dtype=torch.float64).reshape(shape).to(dtype)
    t.copy_(values)
    assert torch.equal(t, values)


def test_buffer_reused_only_after_release():
    first = _pooled(SHAPE)
    second = _pooled(SHAPE)  # both live: never the same memory
    assert first.data_ptr() != second.data_ptr()
    first.fill_(1.0)
    second.fill_(2.0)
    assert bool((first == 1.0).all()) and bool((second == 2.0).all())
    ptr = first.data_ptr()
    assert _C.pool_cached_bytes() == 0
    del first
    assert _C.pool_cached_bytes() == _nbytes(SHAPE)
    third = _pooled(SHAPE)
    assert third.data_ptr() == ptr
    assert _C.pool_cached_bytes() == 0
    assert bool((second == 2.0).all())
    other = _pooled((5, 7))  # another size never gets a cached buffer of this size
    del third
    assert other.data_ptr() != ptr


def test_cache_is_bounded_and_oldest_dropped():
    sizes = [(1000,), (600_000,), (3000,)]
    tensors = [_pooled(s) for s in sizes]
    ptrs = [t.data_ptr() for t in tensors]
    for i in range(len(tensors)):
        tensors[i] = None
        assert _C.pool_cached_bytes() <= _C.pool_max_bytes
    # At most pool_max_buffers (2) stay: the first freed one went back to the system.
    assert _C.pool_max_buffers == 2
    assert _C.pool_cached_bytes() == _nbytes(sizes[1]) + _nbytes(sizes[2])
    again = _pooled(sizes[2])
    assert again.data_ptr() == ptrs[2]


def test_empty_cache_frees():
    t = _pooled(SHAPE)
    del t
    assert _C.pool_cached_bytes() > 0
    klanneal.empty_cache()
    assert _C.pool_cached_bytes() == 0
    live = _pooled(SHAPE)
    klanneal.empty_cache()  # a buffer in use is not affected
    live.fill_(3.0)
    assert bool((live == 3.0).all())


def test_release_from_another_thread():
    holder = [_pooled(SHAPE)]
    holder[0].fill_(1.0)

    def drop() -> None:
        holder.pop()

    thread = threading.Thread(target=drop)
    thread.start()
    thread.join()
    assert _C.pool_cached_bytes() == _nbytes(SHAPE)


def test_unconsumed_capsule_releases():
    capsule = _C.pooled_empty(list(SHAPE), 0)
    del capsule
    assert _C.pool_cached_bytes() == _nbytes(SHAPE)


def test_pooled_empty_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype_code"):
        _C.pooled_empty([4], 7)
    with pytest.raises(ValueError, match="negative"):
        _C.pooled_empty([4, -1], 0)
    with pytest.raises(ValueError, match="at least one element"):
        _C.pooled_empty([4, 0], 0)
    with pytest.raises(ValueError, match="too large"):
        _C.pooled_empty([1 << 62, 1 << 62], 0)


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, seq, vocab = SHAPE
    logits = torch.randn(SHAPE, generator=gen)
    target = torch.randint(0, vocab, (batch, seq), generator=gen)
    mu = torch.randn(batch, 3, generator=gen)
    logvar = torch.randn(batch, 3, generator=gen) * 0.3
    return logits, target, mu, logvar


def _grads(fn, logits, target, mu, logvar):
    leaves = [t.clone().requires_grad_() for t in (logits, mu, logvar)]
    fn(leaves[0], target, leaves[1], leaves[2], 0.7).loss.backward()
    return [t.grad for t in leaves]


def test_training_steps_through_pool_match_reference():
    kept = []
    for step in range(3):
        inputs = _batch(step)
        grads = _grads(elbo_loss, *inputs)
        ref = _grads(elbo_loss_ref, *inputs)
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        kept.append((grads[0], grads[0].clone()))
        # Earlier steps' gradients are still alive: the new call must not
        # have written into their memory.
        for live, snapshot in kept:
            assert torch.equal(live, snapshot)
    assert len({g.data_ptr() for g, _ in kept}) == len(kept)
    del kept
    assert _C.pool_cached_bytes() > 0  # the op's buffers came from the pool


def test_steps_reuse_the_buffer():
    inputs = _batch(0)
    ptrs = []
    for _ in range(2):
        grad = _grads(elbo_loss, *inputs)[0]
        ptrs.append(grad.data_ptr())
        del grad
    assert ptrs[0] == ptrs[1]


def test_pool_disabled_by_env(monkeypatch):
    inputs = _batch(1)
    pooled = _grads(elbo_loss, *inputs)
    klanneal.empty_cache()
    monkeypatch.setenv("KLANNEAL_GRAD_POOL", "0")
    plain = _grads(elbo_loss, *inputs)
    del plain[0]
    assert _C.pool_cached_bytes() == 0
    plain = _grads(elbo_loss, *inputs)
    for got, want in zip(plain, pooled):
        assert torch.equal(got, want)


def test_small_gradients_bypass_pool():
    logits = torch.randn(2, 3, 50, requires_grad=True)
    target = torch.randint(0, 50, (2, 3))
    mu = torch.randn(2, 3, requires_grad=True)
    logvar = torch.randn(2, 3, requires_grad=True)
    elbo_loss(logits, target, mu, logvar).loss.backward()
    logits.grad = None
    assert _C.pool_cached_bytes() == 0


def test_opcheck_with_pooled_gradient():
    logits, target, mu, logvar = _batch(2)
    args = (logits.requires_grad_(), target, mu.requires_grad_(), logvar.requires_grad_())
    options = (_ops.NO_SCHEDULE, 0.7, "categorical", "batchmean", 0.0, "batch", -100, 1.0, True)
    packed = pack_options(*options, True, True, True)
    torch.library.opcheck(torch.ops.klanneal.elbo_loss.default, args + (None, None) + packed)


def test_compiled_loss_through_pool_matches_eager():
    inputs = _batch(3)

    def loss_fn(logits, target, mu, logvar, beta):
        return elbo_loss(logits, target, mu, logvar, beta)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, *inputs)
    want = _grads(elbo_loss, *inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    del got, want
    assert _C.pool_cached_bytes() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch bundles libgomp on Linux")
def test_cpu_kernels_run_on_torchs_openmp_team_unless_told_not_to():
    # torch's idle OpenMP threads spin after each parallel op; a pool of
    # klanneal's own would share the cores with them (parallel_cpu.cpp).
    code = (
        "import torch, klanneal\n"
        "x = torch.randn(64, 40000, requires_grad=True)\n"
        "t = torch.randint(0, 40000, (64,))\n"
        "mu = torch.zeros(64, 4)\n"
        "klanneal.elbo_loss(x, t, mu, mu).loss.backward()\n"
        "print(klanneal._C.cpu_threads_backend())\n"
    )
    # "off", "false", " No " switch it off as "0" does (they used to leave it on).
    cases = ((None, "openmp"), ("0", "pool"), ("off", "pool"), (" No ", "pool"), ("1", "openmp"))
    for flag, want in cases:
        env = {k: v for k, v in os.environ.items() if k != "KLANNEAL_OPENMP"}
        if flag is not None:
            env["KLANNEAL_OPENMP"] = flag
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == want


@pytest.mark.parametrize(
    "value,on", [("0", False), ("", False), ("false", False), (" OFF ", False), ("no", False),
                 ("1", True), ("yes", True), ("true", True), ("2", True)],
)  # fmt: skip
def test_the_environment_switches_read_false_spellings_as_off(monkeypatch, value, on):
    # Regression: any value but "" and "0" switched a flag on, so
    # KLANNEAL_DISABLE_NATIVE=false disabled the native kernel and
    # KLANNEAL_GRAD_POOL=off left the pool on.
    from klanneal import _env

    monkeypatch.setenv("KLANNEAL_DISABLE_NATIVE", value)
    monkeypatch.setenv("KLANNEAL_GRAD_POOL", value)
    assert _env.native_disabled() is on
    assert _ops._pool_enabled() is on
