"""Benchmark of the fused output projection + ELBO (klanneal.linear_elbo_loss).

A text VAE's decoder ends in ``logits = hidden @ weight^T``; the providers
compute that projection and the negative ELBO (categorical reconstruction,
reduction "batchmean", + beta * KL), forward and backward, with the
gradients of hidden, weight, mu and logvar:

  eager          F.linear + F.cross_entropy(reduction="sum") / B + beta * KL / B,
                 as people write it
  compile        torch.compile(eager, dynamic=False), warmed up before timing
  torch-chunked  F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())
                 (torch's chunked CPU path, the logits never materialised) + the same KL
  klanneal       klanneal.linear_elbo_loss (default chunk size)

Cases (fp32, CPU): N = B x T positions, H the decoder's width, V the vocabulary:
``linear-32k`` N=2048 H=256 V=32000 and ``linear-gpt2`` N=1024 H=768 V=50257 (the
GPT-2 head of the Optimus VAE). Times: medians over repeats, providers timed
round-robin in one process. Peak memory: each provider in its own process
(this module with ``--worker``), glibc's mmap threshold fixed (see
_harness.MALLOC_ENV), the weight's gradient included (every provider leaves
it in ``weight.grad``); reported in bytes and as a multiple of the logits'
size N * V * 4 bytes, the tensor none of the chunked providers builds.

Rows: the ELBO benchmark's row format (``case``, ``provider``, ``median_ms``,
``logits_bytes``, ``peak_extra_bytes``, ...) plus ``weight_grad_bytes``, so
that _report renders them and checks issue 12's targets.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402

PROVIDERS = ("eager", "compile", "torch-chunked", "klanneal")
BETA = 0.5
MODE = "full"


@dataclass(frozen=True)
class Case:
    """One shape: hidden [batch, length, width], weight [vocab, width], mu [batch, latent]."""

    name: str
    title: str
    batch: int
    length: int
    width: int
    vocab: int
    latent: int
    quick: tuple[int, int, int, int, int]  # batch, length, width, vocab, latent

    def shape(self, quick: bool) -> tuple[int, int, int, int, int]:
        if quick:
            return self.quick
        return self.batch, self.length, self.width, self.vocab, self.latent


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("linear-32k", "output projection + ELBO, N=2048 H=256 V=32000", 32, 64, 256,
             32000, 32, (4, 8, 24, 1031, 4)),
        Case("linear-gpt2", "output projection + ELBO, GPT-2 head N=1024 H=768 V=50257", 16,
             64, 768, 50257, 32, (2, 8, 40, 2053, 4)),
    )
}  # fmt: skip


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, H] leaf
    weight: torch.Tensor  # [V, H] leaf
    target: torch.Tensor  # [B, T] int64
    mu: torch.Tensor  # [B, D] leaf
    logvar: torch.Tensor  # [B, D] leaf
    beta: torch.Tensor  # 0-d

    def clear_grads(self) -> None:
        for t in (self.hidden, self.weight, self.mu, self.logvar):
            t.grad = None


def make_inputs(case: Case, quick: bool) -> Inputs:
    batch, length, width, vocab, latent = case.shape(quick)
    gen = torch.Generator().manual_seed(0)
    return Inputs(
        hidden=torch.randn(batch, length, width, generator=gen).requires_grad_(),
        weight=(torch.randn(vocab, width, generator=gen) / width**0.5).requires_grad_(),
        target=torch.randint(0, vocab, (batch, length), generator=gen),
        mu=(0.5 * torch.randn(batch, latent, generator=gen)).requires_grad_(),
        logvar=(0.5 * torch.randn(batch, latent, generator=gen)).requires_grad_(),
        beta=torch.tensor(BETA),
    )


LossFn = Callable[..., torch.Tensor]


def _kl_term(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (1 + logvar - mu * mu - logvar.exp())).sum()


def eager_loss(hidden, weight, target, mu, logvar, beta):
    """The hand-written loss: F.linear + F.cross_entropy(sum) / B + beta * KL / B."""
    logits = F.linear(hidden, weight)
    recon = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
    )
    return (recon + beta * _kl_term(mu, logvar)) / mu.shape[0]


def torch_chunked_loss(hidden, weight, target, mu, logvar, beta):
    """torch's chunked linear_cross_entropy (CPU path) + the same KL."""
    recon = F.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        target.reshape(-1),
        reduction="sum",
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return (recon + beta * _kl_term(mu, logvar)) / mu.shape[0]


def klanneal_loss(hidden, weight, target, mu, logvar, beta):
    import klanneal

    return klanneal.linear_elbo_loss(hidden, weight, target, mu, logvar, beta).loss


def loss_function(provider: str) -> LossFn:
    if provider == "eager":
        return eager_loss
    if provider == "compile":
        return torch.compile(eager_loss, dynamic=False)
    if provider == "torch-chunked":
        return torch_chunked_loss
    if provider == "klanneal":
        return klanneal_loss
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def build_entry(provider: str, inputs: Inputs) -> _harness.Timed:
    """One forward + backward of ``provider``; the gradients are cleared before, untimed."""
    loss_fn = loss_function(provider)

    def full(_: Any) -> torch.Tensor:
        loss = loss_fn(
            inputs.hidden, inputs.weight, inputs.target, inputs.mu, inputs.logvar, inputs.beta
        )
        loss.backward()
        return loss.detach()

    return _harness.Timed(provider, full, setup=inputs.clear_grads)


# --------------------------------------------------------------------------- memory


def _worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: warms one provider up, then measures its peak memory."""
    inputs = make_inputs(CASES[spec["case"]], spec["quick"])
    entry = build_entry(spec["provider"], inputs)
    for _ in range(2):
        entry.call(entry.prepare())
    if not _harness.peak_rss_reset_works():
        raise RuntimeError("/proc/self/clear_refs cannot reset VmHWM on this system")
    samples = []
    for _ in range(spec["samples"]):
        inputs.clear_grads()
        samples.append(_harness.cpu_peak_extra_bytes(entry.call, None))
    return {"peak_extra_bytes": max(samples), "samples": samples}


def measure_cpu_memory(spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Runs ``_worker_main(spec)`` in a subprocess; returns its result or an ``error``."""
    return _harness.run_memory_worker(__file__, spec, timeout_s)


# --------------------------------------------------------------------------- suite


def run(
    *,
    cases: Optional[list[str]] = None,
    providers: tuple[str, ...] = PROVIDERS,
    repeats: int = 10,
    warmup: int = 2,
    quick: bool = False,
    memory: bool = True,
    memory_samples: int = 2,
    log: Callable[[str], None] = print,
    failures: Optional[list[str]] = None,
) -> list[dict[str, Any]]:
    """Times every provider on every case (CPU, fp32, forward + backward) and,
    with ``memory``, measures each one's peak extra memory in its own process.

    Quick: tiny shapes, memory of the first case only, no compile worker.
    """
    failures = [] if failures is None else failures
    rows: list[dict[str, Any]] = []
    for index, name in enumerate(cases or list(CASES)):
        case = CASES[name]
        batch, length, width, vocab, latent = case.shape(quick)
        inputs = make_inputs(case, quick)
        label = f"{name} cpu float32 {MODE}"
        entries, losses = [], {}
        for provider in providers:
            log(f"[{label}] warm-up {provider}")
            try:
                entry = build_entry(provider, inputs)
                losses[provider] = float(entry.call(entry.prepare()))
            except Exception as error:  # a provider that fails is reported, not fatal
                message = f"{label}: {provider} failed: {type(error).__name__}: {error}"
                log(message)
                failures.append(message)
                continue
            entries.append(entry)
        names = [entry.name for entry in entries]
        log(f"[{label}] timing {', '.join(names)} ({repeats} repeats, round-robin)")
        times = _harness.time_round_robin(entries, torch.device("cpu"), repeats, warmup)
        measured: dict[str, dict[str, Any]] = {}
        if memory and (not quick or index == 0):
            chosen = [p for p in names if not (quick and p == "compile")]
            log(f"[{label}] peak memory of {', '.join(chosen)}")
            specs = [
                {"case": name, "quick": quick, "provider": p, "samples": memory_samples}
                for p in chosen
            ]
            # One worker at a time: two at once would share the two cores.
            with ThreadPoolExecutor(max_workers=1) as pool:
                measured = dict(zip(chosen, pool.map(measure_cpu_memory, specs)))
        logits_bytes = batch * length * vocab * 4
        reference = losses.get("eager")
        for provider in names:
            row: dict[str, Any] = {
                "case": name,
                "family": "linear",
                "title": case.title,
                "likelihood": "categorical",
                "recon_shape": [batch, length, vocab],
                "hidden_shape": [batch, length, width],
                "latent_dim": latent,
                "device": "cpu",
                "dtype": "float32",
                "mode": MODE,
                "provider": provider,
                **_harness.summarize_times(times[provider]),
                "repeats": len(times[provider]),
                "logits_bytes": logits_bytes,
                "weight_grad_bytes": vocab * width * 4,
                "peak_extra_bytes": None,
                "memory_method": _harness.CPU_MEMORY_METHOD if provider in measured else None,
                "loss": losses.get(provider),
                "loss_rel_diff_vs_eager": None,
            }
            if reference is not None and provider in losses:
                row["loss_rel_diff_vs_eager"] = abs(losses[provider] - reference) / max(
                    abs(reference), 1e-30
                )
            outcome = measured.get(provider, {})
            if "error" in outcome:
                row["memory_error"] = outcome["error"]
            elif outcome:
                row["peak_extra_bytes"] = outcome["peak_extra_bytes"]
                row["memory_samples_bytes"] = outcome["samples"]
                ratio = outcome["peak_extra_bytes"] / logits_bytes
                log(f"[{label}] memory {provider}: {outcome['peak_extra_bytes'] / 2**20:.1f} MiB"
                    f" = {ratio:.2f}x logits")  # fmt: skip
            rows.append(row)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.case_main(__doc__, run, _worker_main, argv)


if __name__ == "__main__":
    sys.exit(main())
