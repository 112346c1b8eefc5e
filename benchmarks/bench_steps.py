"""Per-call overhead and whole training steps: where the fixed cost of a call shows.

Cases (CPU, fp32, forward + backward; providers of a case timed round-robin
in one process, medians over the repeats):

  overhead    B=2 bernoulli batch of 784 pixels, D=16: ``klanneal.elbo_loss``
              against ``noop``, an autograd.Function on the same inputs that
              does nothing (the floor of any autograd-attached op),
              ``noop-grads``, the same returning three precomputed gradients
              (the floor of one that returns them: autograd accumulates them
              into the inputs' .grad), ``kernel-floor``, what any
              Python-attached op over this torch-free kernel cannot avoid
              (allocate the eight outputs, call the kernel, attach the loss
              returning its gradients; no argument handling at all), and the
              hand-written loss. klanneal - noop is the op's own per-call cost;
              kernel-floor - noop its lower bound.
  mnist-step  a complete MNIST-style training step: MLP encoder 784-400-2x16,
              decoder 16-400-784, B=128, Adam; the loss either hand-written
              (``F.binary_cross_entropy_with_logits(..., reduction="sum") / B
              + beta * kl``) or ``klanneal.nn.ELBOLoss`` (with its step());
              10x the suite's repeats, at least 200.
  text-step   the text VAE of examples/text_vae.py (embeddings 128, LSTMs 256,
              D=32, V=10000, B=32 sentences of 40 tokens), one training step
              with the hand-written ``F.cross_entropy(reduction="sum") / B +
              beta * kl``, ``klanneal.elbo_loss``, or (``klanneal-fused-head``)
              the output layer and the loss in ``klanneal.linear_elbo_loss``.

Rows: ``{"case": "steps", "mode": <case>, "provider", "median_ms", "p20_ms",
"p80_ms", "repeats"}`` (the report's "Training steps and per-call overhead"
section).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402

import klanneal  # noqa: E402

BETA = 0.5


def _row(mode: str, provider: str, seconds: list[float]) -> dict[str, Any]:
    return {
        "case": "steps",
        "mode": mode,
        "provider": provider,
        **_harness.summarize_times(seconds),
        "repeats": len(seconds),
        "device": "cpu",
        "dtype": "float32",
    }


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()


class _Noop(torch.autograd.Function):
    """The cheapest autograd-attached call: returns a 0-d zero, gradients None."""

    @staticmethod
    def forward(ctx, x, mu, logvar):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


class _Attach(torch.autograd.Function):
    """kernel-floor's attachment: the loss computed outside, its gradients saved."""

    @staticmethod
    def forward(ctx, state, *tracked):
        ctx.save_for_backward(*state[1])
        return state[0]

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.saved_tensors)


def _kernel_floor(
    x: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> Callable[[], None]:
    """kernel-floor: one fused bernoulli call (batchmean, beta BETA) with none of
    elbo_loss's argument handling: the packed options are built once here, in
    the layout klanneal._C exports; each call allocates the outputs, calls the
    CPU kernel and attaches the loss (checked against elbo_loss below)."""
    from klanneal import _C, _ops

    layout = _C.elbo_layout()
    options = _ops.elbo_options("bernoulli", "batchmean", 0.0, "batch", -100, 1.0, True)
    floats, ints = options.pack(
        beta_value=BETA, need_grad_recon=True, need_grad_mu=True, need_grad_logvar=True
    )
    fp32 = layout["dtype"].index("float32")
    size = {
        "batch": x.shape[0], "n_rows": x.shape[0], "row_len": x.shape[1],
        "latent_dim": mu.shape[1], "recon_dtype": fp32, "latent_dtype": fp32,
        "n_threads": torch.get_num_threads(), "out_dtype": fp32,
    }  # fmt: skip
    sizes = [size[name] for name in layout["sizes"]]
    slot = {name: k for k, name in enumerate(layout["ptrs"])}
    order = [slot[name] for name in ("recon_input", "target", "mu", "logvar")]
    outputs = [slot[name] for name in ("loss", "recon", "kl", "kl_per_dim", "beta_out")]
    grads = [slot[name] for name in ("grad_recon", "grad_mu", "grad_logvar")]
    apply = _Attach.apply
    empty, empty_like = torch.empty, torch.empty_like
    latent_dim = mu.shape[1]

    def call() -> torch.Tensor:
        out = (empty(size=()), empty(size=()), empty(size=()), empty(latent_dim), empty(size=()))
        g = (empty_like(x), empty_like(mu), empty_like(logvar))
        ptrs = [0] * len(slot)
        for k, t in zip(order, (x, target, mu, logvar)):
            ptrs[k] = t.data_ptr()
        for k, t in zip(outputs + grads, out + g):
            ptrs[k] = t.data_ptr()
        _C.elbo_forward_cpu(sizes, ptrs, floats, ints)
        return apply((out[0], g), x, mu, logvar)

    expected = klanneal.elbo_loss(x, target, mu, logvar, BETA, likelihood="bernoulli").loss
    torch.testing.assert_close(call().detach(), expected.detach(), rtol=0, atol=0)
    return lambda: call().backward()


class _NoopGrads(torch.autograd.Function):
    """_Noop returning the precomputed gradients ``grads`` (set by overhead_case)."""

    grads: tuple[torch.Tensor, ...] = ()

    @staticmethod
    def forward(ctx, x, mu, logvar):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return _NoopGrads.grads


def overhead_case(repeats: int, warmup: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 784, generator=gen).requires_grad_()
    target = torch.rand(2, 784, generator=gen)
    mu = torch.randn(2, 16, generator=gen).requires_grad_()
    logvar = torch.randn(2, 16, generator=gen).requires_grad_()
    beta = torch.tensor(BETA)
    calls_per_timing = 50  # one timed sample = 50 calls: microseconds need it

    def many(fn: Callable[[], None]) -> Callable[[Any], None]:
        def run(_: Any) -> None:
            for _ in range(calls_per_timing):
                fn()

        return run

    def fused() -> None:
        klanneal.elbo_loss(x, target, mu, logvar, beta, likelihood="bernoulli").loss.backward()

    def noop() -> None:
        _Noop.apply(x, mu, logvar).backward()

    _NoopGrads.grads = (torch.zeros_like(x), torch.zeros_like(mu), torch.zeros_like(logvar))

    def noop_grads() -> None:
        _NoopGrads.apply(x, mu, logvar).backward()

    def hand() -> None:
        recon = F.binary_cross_entropy_with_logits(x, target, reduction="sum") / 2
        (recon + beta * _kl(mu, logvar) / 2).backward()

    entries = [
        _harness.Timed("klanneal", many(fused)),
        _harness.Timed("noop", many(noop)),
        _harness.Timed("noop-grads", many(noop_grads)),
        _harness.Timed("kernel-floor", many(_kernel_floor(x, target, mu, logvar))),
        _harness.Timed("hand-written", many(hand)),
    ]
    times = _harness.time_round_robin(entries, torch.device("cpu"), repeats, warmup)
    return [
        _row("overhead B=2 (per call)", name, [t / calls_per_timing for t in seconds])
        for name, seconds in times.items()
    ]


class _MlpVae(nn.Module):
    def __init__(self, latent: int = 16) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 400), nn.ReLU(), nn.Linear(400, 784))

    def forward(self, x: torch.Tensor):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.dec(z), mu, logvar


def mnist_case(repeats: int, warmup: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    batch = (torch.rand(128, 784) > 0.5).float()
    models = {name: _MlpVae() for name in ("hand-written", "klanneal")}
    models["klanneal"].load_state_dict(models["hand-written"].state_dict())
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    criterion = klanneal.nn.ELBOLoss(
        schedule=klanneal.schedules.Cyclical(total_steps=10_000), likelihood="bernoulli"
    )
    schedule = klanneal.schedules.Cyclical(total_steps=10_000)
    step = [0]

    def hand(_: Any) -> None:
        model, opt = models["hand-written"], opts["hand-written"]
        logits, mu, logvar = model(batch)
        beta = schedule(step[0])
        recon = F.binary_cross_entropy_with_logits(logits, batch, reduction="sum") / 128
        loss = recon + beta * _kl(mu, logvar) / 128
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step[0] += 1

    def fused(_: Any) -> None:
        model, opt = models["klanneal"], opts["klanneal"]
        logits, mu, logvar = model(batch)
        loss = criterion(logits, batch, mu, logvar).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        criterion.step()

    entries = [_harness.Timed("hand-written", hand), _harness.Timed("klanneal", fused)]
    times = _harness.time_round_robin(entries, torch.device("cpu"), repeats, warmup)
    return [_row("MNIST-style step B=128", name, s) for name, s in times.items()]


def text_case(repeats: int, warmup: int, quick: bool) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import text_vae

    torch.manual_seed(0)
    vocab, batch_size, length = (500, 8, 12) if quick else (10_000, 32, 40)
    gen = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(4, vocab, (length,), generator=gen).tolist() for _ in range(batch_size)
    ]
    batch = text_vae.make_batch(sequences)
    names = ("hand-written", "klanneal", "klanneal-fused-head")
    models = {name: text_vae.TextVAE(vocab, 128, 256, 32, dropout=0.0) for name in names}
    for name in names[1:]:
        models[name].load_state_dict(models["hand-written"].state_dict())
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}

    def step(name: str) -> Callable[[Any], None]:
        model, opt = models[name], opts[name]

        def run(_: Any) -> None:
            # Before the loss: the fused head computes the output layer's
            # gradients in its forward pass.
            opt.zero_grad(set_to_none=True)
            if name == "klanneal-fused-head":
                hidden, mu, logvar = model.features(batch)
                loss = klanneal.linear_elbo_loss(
                    hidden, model.out.weight, batch.target, mu, logvar, BETA,
                    bias=model.out.bias, ignore_index=text_vae.IGNORE_INDEX,
                ).loss  # fmt: skip
            elif name == "klanneal":
                logits, mu, logvar = model(batch)
                loss = klanneal.elbo_loss(
                    logits, batch.target, mu, logvar, BETA, ignore_index=text_vae.IGNORE_INDEX
                ).loss
            else:
                logits, mu, logvar = model(batch)
                recon = F.cross_entropy(
                    logits.reshape(-1, vocab), batch.target.reshape(-1),
                    ignore_index=text_vae.IGNORE_INDEX, reduction="sum",
                )  # fmt: skip
                loss = (recon + BETA * _kl(mu, logvar)) / batch_size
            loss.backward()
            opt.step()

        return run

    entries = [_harness.Timed(n, step(n)) for n in names]
    times = _harness.time_round_robin(entries, torch.device("cpu"), repeats, warmup)
    mode = f"text VAE step B={batch_size} T={length + 1} V={vocab}"
    return [_row(mode, name, s) for name, s in times.items()]


def run(quick: bool = False, repeats: int = 30, warmup: int = 3) -> list[dict[str, Any]]:
    """Every case; quick: fewer repeats and a small text model (seconds)."""
    if quick:
        repeats, warmup = min(repeats, 5), min(warmup, 1)
    return (
        overhead_case(repeats, warmup)
        # A step is ~10 ms, and the loss ~5% of it, while one step's time
        # varies by +-5% here: ten times the repeats (at least 200 unless
        # quick, ~4 s) for a median that the machine's noise does not swamp.
        + mnist_case(repeats if quick else max(10 * repeats, 200), warmup)
        + text_case(max(5, repeats // 3), warmup, quick)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, repeats=args.repeats)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
