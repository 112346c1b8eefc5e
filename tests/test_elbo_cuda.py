"""The fused ELBO op on CUDA against the pure-PyTorch reference.

Every test here needs a CUDA GPU and a klanneal built with its CUDA kernels;
without them the whole module is skipped (the CPU-only CI machines compile
the kernels but cannot run them: tests/test_elbo_cuda_binding.py covers what
can be checked there).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import pytest
import torch
from elbo_cases import pack_options

import klanneal
from klanneal import _ops
from klanneal.reference import elbo_loss_ref
from klanneal.schedules import Cyclical, Monotonic

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not klanneal.build_info().get("cuda", False),
        reason="klanneal was built without its CUDA kernels",
    ),
]

DEVICE = "cuda"
IGNORE = -100
LIKELIHOODS = ("categorical", "bernoulli", "gaussian", "mse")
REDUCTIONS = ("batchmean", "sum", "none")
# (free_bits, free_bits_mode): off, batch-mean free bits, per-sample free bits.
FREE_BITS = ((0.0, "batch"), (0.3, "batch"), (0.3, "sample"))
BETA_KINDS = ("float", "tensor", "schedule")
# Tolerances of the fused op against the float64 reference (computed from the
# same, already rounded, inputs).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def make_inputs(
    likelihood: str,
    shape: tuple[int, ...],
    latent_dim: int,
    dtype: torch.dtype = torch.float32,
    latent_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    ignore_fraction: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Random CUDA inputs; recon_input [B, ...], mu/logvar [B, D]."""
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    if likelihood == "categorical":
        vocab = shape[-1]
        recon = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.randint(0, vocab, shape[:-1], generator=gen)
        if ignore_fraction > 0:
            target[torch.rand(shape[:-1], generator=gen) < ignore_fraction] = IGNORE
    elif likelihood == "bernoulli":
        recon = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        recon = torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    latent_dtype = latent_dtype or dtype
    mu = torch.randn(batch, latent_dim, generator=gen, dtype=torch.float64)
    logvar = 0.7 * torch.randn(batch, latent_dim, generator=gen, dtype=torch.float64)
    return {
        "recon_input": recon.to(dtype).to(DEVICE),
        "target": target.to(DEVICE),
        "mu": mu.to(latent_dtype).to(DEVICE),
        "logvar": logvar.to(latent_dtype).to(DEVICE),
    }


def make_beta(kind: str) -> tuple[Any, Any]:
    """(beta, step) for elbo_loss: a float, a 0-d CUDA tensor or schedule + step tensor."""
    if kind == "float":
        return 0.7, None
    if kind == "tensor":
        return torch.tensor(0.7, device=DEVICE), None
    return Monotonic(10, start=0.1, stop=1.0), torch.tensor(4, device=DEVICE)


def run(
    fn: Any,
    inputs: dict[str, torch.Tensor],
    beta: Any,
    step: Any,
    *,
    compute_dtype: Optional[torch.dtype] = None,
    upstream_seed: int = 1,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Calls fn (elbo_loss or elbo_loss_ref) and backpropagates an upstream
    gradient other than 1; returns (outputs, gradients of the float inputs)."""
    leaves = {}
    for name in ("recon_input", "mu", "logvar"):
        t = inputs[name].detach()
        if compute_dtype is not None:
            t = t.to(compute_dtype)
        leaves[name] = t.clone().requires_grad_(True)
    target = inputs["target"]
    if compute_dtype is not None and target.dtype.is_floating_point:
        target = target.to(compute_dtype)
    out = fn(
        leaves["recon_input"], target, leaves["mu"], leaves["logvar"], beta, step=step, **kwargs
    )
    if out.loss.dim() == 0:
        (2.5 * out.loss).backward()
    else:
        gen = torch.Generator().manual_seed(upstream_seed)
        weights = torch.rand(out.loss.shape, generator=gen, dtype=torch.float64) + 0.5
        (out.loss * weights.to(out.loss.device, out.loss.dtype)).sum().backward()
    return out, {name: t.grad for name, t in leaves.items()}


def assert_close_to_reference(
    inputs: dict[str, torch.Tensor], beta: Any, step: Any, tol: dict[str, float], **kwargs: Any
) -> None:
    """Fused op vs the float64 reference: outputs and all three gradients."""
    out, grads = run(klanneal.elbo_loss, inputs, beta, step, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("inplace", "validate")}
    ref, ref_grads = run(
        elbo_loss_ref, inputs, beta, step, compute_dtype=torch.float64, **ref_kwargs
    )
    for field in ("loss", "recon", "kl", "kl_per_dim", "beta"):
        got, want = getattr(out, field), getattr(ref, field)
        assert got.device.type == "cuda", field
        torch.testing.assert_close(got.double(), want.double(), **tol, msg=field)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), want, **tol, msg=f"grad {name}")


# ---- values and gradients ------------------------------------------------------------


@pytest.mark.parametrize("beta_kind", BETA_KINDS)
@pytest.mark.parametrize("free_bits,free_bits_mode", FREE_BITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_matches_reference(likelihood, reduction, free_bits, free_bits_mode, beta_kind):
    if reduction == "none" and free_bits > 0 and free_bits_mode == "batch":
        pytest.skip("reduction='none' rejects batch free bits (tested on the CPU)")
    shape = (3, 5, 41) if likelihood == "categorical" else (3, 7, 5)
    inputs = make_inputs(likelihood, shape, latent_dim=5, ignore_fraction=0.2)
    beta, step = make_beta(beta_kind)
    assert_close_to_reference(
        inputs,
        beta,
        step,
        TOL[torch.float32],
        likelihood=likelihood,
        reduction=reduction,
        free_bits=free_bits,
        free_bits_mode=free_bits_mode,
        ignore_index=IGNORE,
        gaussian_var=0.7,
    )


# V <= 1024 takes the warp-per-row kernel, longer rows the block-per-row one;
# odd V leaves every other row misaligned for vector loads.
@pytest.mark.parametrize("vocab", [1, 41, 401, 1024, 1025, 10007])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_shapes(vocab, batch, dtype):
    inputs = make_inputs("categorical", (batch, 4, vocab), 3, dtype=dtype, ignore_fraction=0.3)
    for reduction in REDUCTIONS:
        assert_close_to_reference(inputs, 0.5, None, TOL[dtype], reduction=reduction)


def test_all_ignored_example_contributes_nothing():
    inputs = make_inputs("categorical", (3, 6, 97), 4)
    inputs["target"][1] = IGNORE
    assert_close_to_reference(inputs, 1.0, None, TOL[torch.float32], reduction="none")
    out, grads = run(klanneal.elbo_loss, inputs, 1.0, None, reduction="none")
    assert out.recon[1].item() == 0.0
    assert torch.all(grads["recon_input"][1] == 0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "mse"])
def test_long_rows_split_into_chunks(likelihood):
    # 2 * 4096 + 3 elements per example: three chunks, the last one short.
    inputs = make_inputs(likelihood, (2, 8195), 6)
    for reduction in REDUCTIONS:
        assert_close_to_reference(
            inputs, 0.3, None, TOL[torch.float32], likelihood=likelihood, reduction=reduction
        )


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_misaligned_inputs_take_the_scalar_path(likelihood):
    # Contiguous tensors whose storage starts one element past a 16-byte
    # boundary: the kernels must fall back to scalar loads.
    inputs = make_inputs(likelihood, (3, 4, 64), 4)
    for name in ("recon_input", "target", "mu", "logvar"):
        t = inputs[name]
        if not t.dtype.is_floating_point:
            continue
        buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEVICE)
        shifted = buffer[1:].view(t.shape)
        shifted.copy_(t)
        assert shifted.data_ptr() % 16 != 0
        inputs[name] = shifted
    assert_close_to_reference(inputs, 0.8, None, TOL[torch.float32], likelihood=likelihood)


def test_mixed_recon_and_latent_dtypes():
    inputs = make_inputs(
        "categorical", (2, 3, 300), 4, dtype=torch.float32, latent_dtype=torch.float64
    )
    assert_close_to_reference(inputs, 0.9, None, TOL[torch.float32])


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_inplace_writes_the_same_gradient(likelihood):
    inputs = make_inputs(likelihood, (3, 5, 1031), 4, ignore_fraction=0.2)
    ref, ref_grads = run(elbo_loss_ref, inputs, 0.6, None, likelihood=likelihood)
    base = inputs["recon_input"].clone().requires_grad_(True)
    recon_input = base * 1.0  # not a leaf: inplace may overwrite it
    out = klanneal.elbo_loss(
        recon_input, inputs["target"], inputs["mu"], inputs["logvar"], 0.6,
        likelihood=likelihood, inplace=True,
    )  # fmt: skip
    (2.5 * out.loss).backward()
    torch.testing.assert_close(out.loss, ref.loss, **TOL[torch.float32])
    torch.testing.assert_close(base.grad, ref_grads["recon_input"], **TOL[torch.float32])


@pytest.mark.parametrize("free_bits_mode", ["batch", "sample"])
def test_free_bits_tie_passes_the_gradient(free_bits_mode):
    # mu = 1, logvar = 0 gives KL_bd = 0.5 exactly: a tie with lambda = 0.5,
    # where torch.clamp (the reference) passes the gradient.
    inputs = make_inputs("gaussian", (4, 6), 3)
    inputs["mu"] = torch.ones(4, 3, device=DEVICE)
    inputs["logvar"] = torch.zeros(4, 3, device=DEVICE)
    kwargs = dict(likelihood="gaussian", free_bits=0.5, free_bits_mode=free_bits_mode)
    assert_close_to_reference(inputs, 1.0, None, TOL[torch.float32], **kwargs)
    _, grads = run(klanneal.elbo_loss, inputs, 1.0, None, **kwargs)
    assert torch.all(grads["mu"] != 0)


def test_gradcheck_float64():
    inputs = make_inputs("categorical", (2, 3, 7), 3, dtype=torch.float64, ignore_fraction=0.2)
    target = inputs["target"]

    def loss(recon_input, mu, logvar):
        return klanneal.elbo_loss(recon_input, target, mu, logvar, 0.4, free_bits=0.1).loss

    args = [inputs[n].clone().requires_grad_(True) for n in ("recon_input", "mu", "logvar")]
    assert torch.autograd.gradcheck(loss, args)


# ---- low precision --------------------------------------------------------------------


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.linalg.vector_norm(a.double() - b.double()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_half_precision_error_budget(dtype, likelihood):
    # The fused op may be at most ~2x as far from the float64 result as the
    # reference computed in the same low precision (plus one rounding of the
    # output, in case the reference happens to be exact).
    shape = (4, 8, 3001) if likelihood == "categorical" else (4, 8, 301)
    inputs = make_inputs(likelihood, shape, 16, dtype=dtype, ignore_fraction=0.1)
    beta, step = 0.7, None
    exact, exact_grads = run(
        elbo_loss_ref, inputs, beta, step, compute_dtype=torch.float64, likelihood=likelihood
    )
    low, low_grads = run(elbo_loss_ref, inputs, beta, step, likelihood=likelihood)
    fused, fused_grads = run(klanneal.elbo_loss, inputs, beta, step, likelihood=likelihood)
    eps = torch.finfo(dtype).eps
    for field in ("loss", "recon", "kl", "kl_per_dim"):
        want = getattr(exact, field)
        budget = 2 * _distance(getattr(low, field), want) + eps * want.double().norm().item()
        assert _distance(getattr(fused, field), want) <= budget, field
    for name, want in exact_grads.items():
        budget = 2 * _distance(low_grads[name], want) + eps * want.double().norm().item()
        assert _distance(fused_grads[name], want) <= budget, f"grad {name}"


# ---- determinism, streams, invalid targets ------------------------------------------------


@pytest.mark.parametrize("vocab", [257, 3001])
def test_bitwise_reproducible(vocab):
    inputs = make_inputs("categorical", (16, 37, vocab), 64, ignore_fraction=0.1)
    first, first_grads = run(klanneal.elbo_loss, inputs, 0.7, None, free_bits=0.2)
    for _ in range(4):
        again, again_grads = run(klanneal.elbo_loss, inputs, 0.7, None, free_bits=0.2)
        for field in ("loss", "recon", "kl", "kl_per_dim"):
            assert torch.equal(getattr(again, field), getattr(first, field)), field
        for name in first_grads:
            assert torch.equal(again_grads[name], first_grads[name]), name


def test_runs_on_the_current_non_default_stream():
    inputs = make_inputs("categorical", (4, 6, 500), 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(klanneal.elbo_loss, inputs, 0.5, None, validate=False)  # warm-up: allocator, modules
    side.synchronize()
    # Keep the default stream busy: work enqueued on `side` must finish
    # without waiting for it.
    torch.cuda._sleep(2**30)
    with torch.cuda.stream(side):
        out, grads = run(klanneal.elbo_loss, inputs, 0.5, None, validate=False)
    side.synchronize()
    assert not torch.cuda.current_stream().query(), "the op waited for the default stream"
    torch.cuda.synchronize()
    ref, ref_grads = run(elbo_loss_ref, inputs, 0.5, None, compute_dtype=torch.float64)
    torch.testing.assert_close(out.loss.double(), ref.loss, **TOL[torch.float32])
    torch.testing.assert_close(
        grads["recon_input"].double(), ref_grads["recon_input"], **TOL[torch.float32]
    )


def test_invalid_target_without_validation_gives_nan_for_that_row():
    inputs = make_inputs("categorical", (3, 4, 41), 4)
    bad = inputs["target"].clone()
    bad[1, 2] = 41  # == V
    bad[2, 0] = 2**40
    inputs_bad = dict(inputs, target=bad)
    out, _ = run(klanneal.elbo_loss, inputs_bad, 1.0, None, reduction="none", validate=False)
    torch.cuda.synchronize()  # an out-of-bounds read would surface here
    assert torch.isnan(out.loss[1]) and torch.isnan(out.loss[2])
    ref, _ = run(elbo_loss_ref, inputs, 1.0, None, compute_dtype=torch.float64, reduction="none")
    torch.testing.assert_close(out.loss[0].double(), ref.loss[0], **TOL[torch.float32])
    total, _ = run(klanneal.elbo_loss, inputs_bad, 1.0, None, validate=False)
    assert torch.isnan(total.loss)
    with pytest.raises(ValueError, match="target"):
        klanneal.elbo_loss(inputs_bad["recon_input"], bad, inputs["mu"], inputs["logvar"])


@pytest.mark.slow
def test_more_than_2_31_logits_are_indexed_with_int64():
    free_bytes, _ = torch.cuda.mem_get_info()
    if free_bytes < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    # 4 * 65537 * 8209 fp16 logits = 2_151_972_932 elements > 2**31: the last
    # example's rows start past 2**31.
    batch, seq_len, vocab = 4, 65537, 8209
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(batch, seq_len, vocab, device=DEVICE, dtype=torch.float16, generator=gen)
    target = torch.randint(0, vocab, (batch, seq_len), device=DEVICE, generator=gen)
    # float32 latents: the result is float32 (a per-example sum overflows fp16).
    mu = torch.zeros(batch, 2, device=DEVICE)
    logits.requires_grad_(True)
    out = klanneal.elbo_loss(logits, target, mu, mu.clone(), reduction="none")
    out.loss.sum().backward()
    last = logits.detach()[-1:].float().requires_grad_(True)
    ref = elbo_loss_ref(last, target[-1:], mu[-1:], mu[-1:], reduction="none")
    ref.loss.sum().backward()
    torch.testing.assert_close(out.loss[-1], ref.loss[0], rtol=1e-4, atol=0.0)
    torch.testing.assert_close(
        logits.grad[-1, -8:].float(), last.grad[0, -8:], rtol=1e-2, atol=1e-6
    )


# ---- the op itself ---------------------------------------------------------------------


@pytest.mark.parametrize("beta_kind", BETA_KINDS)
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_opcheck_on_cuda(likelihood, beta_kind):
    inputs = make_inputs(likelihood, (2, 3, 6), 3)
    x, mu, logvar = (
        inputs[n].clone().requires_grad_(True) for n in ("recon_input", "mu", "logvar")
    )
    beta = torch.tensor(0.5, dtype=torch.float64, device=DEVICE) if beta_kind == "tensor" else None
    step = torch.tensor(3, device=DEVICE) if beta_kind == "schedule" else None
    schedule = (
        Monotonic(10, start=0.0, stop=1.0).to_params() if step is not None else _ops.NO_SCHEDULE
    )
    tensors = (x, inputs["target"], mu, logvar, beta, step)
    options = (schedule, 0.7, likelihood, "batchmean", 0.1, "sample", IGNORE, 1.0, True)
    args = tensors + pack_options(*options, True, True, True)
    torch.library.opcheck(torch.ops.klanneal.elbo_loss.default, args)
    detached = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in tensors)
    args = detached + pack_options(*options, True, False, False)
    torch.library.opcheck(torch.ops.klanneal.elbo_loss_inplace.default, args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_a_device_other_than_the_current_one():
    inputs = {k: v.to("cuda:1") for k, v in make_inputs("categorical", (2, 3, 50), 4).items()}
    with torch.cuda.device(0):
        out = klanneal.elbo_loss(
            inputs["recon_input"], inputs["target"], inputs["mu"], inputs["logvar"]
        )
        torch.cuda.synchronize(1)
    ref = elbo_loss_ref(*(inputs[n].cpu().double() if n != "target" else inputs[n].cpu()
                          for n in ("recon_input", "target", "mu", "logvar")))  # fmt: skip
    assert out.loss.device == torch.device("cuda:1")
    torch.testing.assert_close(out.loss.cpu().double(), ref.loss, **TOL[torch.float32])


# ---- torch.compile and CUDA graphs --------------------------------------------------------


# Importing torch._inductor (torch 2.13) trips torch's own deprecation of
# torch.jit.script_method in torch/utils/mkldnn.py; not klanneal's to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("beta_kind", ["tensor", "schedule"])
def test_compile_reduce_overhead_no_recompiles(beta_kind):
    torch._dynamo.reset()
    inputs = make_inputs("categorical", (4, 5, 301), 6, ignore_fraction=0.1)
    schedule = Monotonic(8, start=0.0, stop=1.0)

    def loss_fn(recon_input, target, mu, logvar, beta, step):
        beta_arg = schedule if step is not None else beta
        out = klanneal.elbo_loss(
            recon_input, target, mu, logvar, beta_arg, step=step, validate=False
        )
        return out.loss

    compiled = torch.compile(loss_fn, fullgraph=True, mode="reduce-overhead")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(5):
            if beta_kind == "tensor":
                beta, step, beta_ref = (
                    torch.tensor(0.2 * i + 0.1, device=DEVICE),
                    None,
                    0.2 * i + 0.1,
                )
            else:
                beta, step, beta_ref = None, torch.tensor(2 * i, device=DEVICE), schedule(2 * i)
            leaves = [
                inputs[n].clone().requires_grad_(True) for n in ("recon_input", "mu", "logvar")
            ]
            torch.compiler.cudagraph_mark_step_begin()
            loss = compiled(leaves[0], inputs["target"], leaves[1], leaves[2], beta, step)
            # Graph outputs are overwritten by the next replay: keep a copy.
            loss_value = loss.detach().clone()
            (2.5 * loss).backward()
            ref, ref_grads = run(elbo_loss_ref, inputs, beta_ref, None, compute_dtype=torch.float64)
            torch.testing.assert_close(loss_value.double(), ref.loss, **TOL[torch.float32])
            for leaf, name in zip(leaves, ("recon_input", "mu", "logvar")):
                torch.testing.assert_close(
                    leaf.grad.double(), ref_grads[name], **TOL[torch.float32]
                )


class TinyVAE(torch.nn.Module):
    """One-hot token sequences [B, T, V] -> q(z|x) -> logits [B, T, V]."""

    def __init__(self, seq_len: int, vocab: int, latent_dim: int) -> None:
        super().__init__()
        self.seq_len, self.vocab = seq_len, vocab
        self.encoder = torch.nn.Linear(seq_len * vocab, 2 * latent_dim)
        self.decoder = torch.nn.Linear(latent_dim, seq_len * vocab)

    def forward(self, one_hot: torch.Tensor, noise: torch.Tensor):
        mu, logvar = self.encoder(one_hot.flatten(1)).chunk(2, dim=-1)
        z = mu + noise * torch.exp(0.5 * logvar)
        logits = self.decoder(z).view(-1, self.seq_len, self.vocab)
        return logits, mu, logvar


@pytest.mark.parametrize("api", ["function", "module"])
def test_cuda_graph_training_step_with_scheduled_beta(api):
    batch, seq_len, vocab, latent_dim, n_steps = 8, 6, 33, 4, 6
    torch.manual_seed(0)
    initial = TinyVAE(seq_len, vocab, latent_dim).to(DEVICE)
    tokens = torch.randint(0, vocab, (batch, seq_len), device=DEVICE)
    one_hot = torch.nn.functional.one_hot(tokens, vocab).float()
    noises = [torch.randn(batch, latent_dim, device=DEVICE) for _ in range(n_steps)]
    # Two cosine cycles over 8 steps: beta 0, 0.5, 1, 1, 0, 0.5 over the replays.
    schedule = Cyclical(8, n_cycles=2, ratio=0.5, shape="cosine")

    def make_step(model, optimizer, noise):
        """(train_step, step): one optimizer step; the step counter lives on the GPU."""
        criterion = klanneal.nn.ELBOLoss(schedule, validate=False).to(DEVICE)
        if api == "module":
            step = criterion.current_step
        else:
            step = torch.zeros((), dtype=torch.int64, device=DEVICE)

        def train_step():
            optimizer.zero_grad(set_to_none=False)
            logits, mu, logvar = model(one_hot, noise)
            if api == "module":
                out = criterion(logits, tokens, mu, logvar)
            else:
                out = klanneal.elbo_loss(
                    logits, tokens, mu, logvar, schedule, step=step, validate=False
                )
            out.loss.backward()
            optimizer.step()
            if api == "module":
                criterion.step()
            else:
                step.add_(1)
            return out.loss.detach(), out.beta

        return train_step, step

    # Eager run.
    eager_model = copy.deepcopy(initial)
    eager_noise = torch.empty_like(noises[0])
    eager_train, _ = make_step(
        eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.05), eager_noise
    )
    eager_losses, eager_betas = [], []
    for noise in noises:
        eager_noise.copy_(noise)
        loss, beta = eager_train()
        eager_losses.append(loss.clone())
        eager_betas.append(beta.clone())

    # Captured run: warm up on a side stream, restore the state, capture once, replay.
    graph_model = copy.deepcopy(initial)
    static_noise = noises[0].clone()
    graph_train, graph_step = make_step(
        graph_model, torch.optim.SGD(graph_model.parameters(), lr=0.05), static_noise
    )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            graph_train()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, p0 in zip(graph_model.parameters(), initial.parameters()):
            p.copy_(p0)
    graph_step.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_beta = graph_train()
    # Capture does not run the work: state is still the initial one here.
    assert graph_step.item() == 0
    graph_losses, graph_betas = [], []
    for noise in noises:
        static_noise.copy_(noise)
        graph.replay()
        graph_losses.append(static_loss.clone())
        graph_betas.append(static_beta.clone())
    torch.cuda.synchronize()

    assert graph_step.item() == n_steps
    assert len({round(b.item(), 6) for b in graph_betas}) > 1, "beta must change between replays"
    for i in range(n_steps):
        assert graph_betas[i].item() == pytest.approx(schedule(i))
        torch.testing.assert_close(graph_betas[i], eager_betas[i])
        torch.testing.assert_close(graph_losses[i], eager_losses[i], rtol=1e-5, atol=1e-5)
    for p_graph, p_eager in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-5, atol=1e-6)
