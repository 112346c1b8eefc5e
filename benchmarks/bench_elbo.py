"""Benchmark of the ELBO loss: the hand-written loss vs torch.compile vs the fused klanneal op.

Providers (side by side, timed round-robin in one process):
  eager             ``handwritten_loss``: the loss as people write it, torch's own fused
                    losses (F.cross_entropy / F.binary_cross_entropy_with_logits /
                    F.mse_loss with reduction="sum") + beta * the closed-form KL, / B
  compile           torch.compile(handwritten_loss, dynamic=False), warmed up before timing
  klanneal          klanneal.elbo_loss(..., inplace=False)
  klanneal-inplace  klanneal.elbo_loss(..., inplace=True), full mode only (see below)
  liger             Liger-Kernel's cross-entropy + a PyTorch KL (categorical cases, CUDA
                    only, when liger_kernel is importable)
  memcpy            dst.copy_(logits) into a preallocated buffer: one read and one write
                    of the largest tensor, the physical limit every ratio is quoted against

Modes: ``forward`` runs the loss under torch.no_grad(); ``full`` runs forward and
backward. Beta is a 0-d tensor for every provider, as a training loop with a
schedule passes it (and so that torch.compile does not specialise on it).

Fresh logits for every call: before every timed call, outside the timed
region and for every provider alike, a fixed base tensor is copied into fresh
logits, so each call starts from the same state even when a provider
overwrites its input (klanneal-inplace and Liger write the gradient there).

How ``full`` mode is made fair to the in-place provider: the logits are not a
leaf but the output of ``_DecoderStandIn``, an autograd.Function standing in
for the decoder's last layer (its forward is that copy). Its backward receives
the logits' gradient and drops it, as a real decoder's matmul would consume
it, so the decoder's own backward is not timed for anyone, and the gradient is
not kept in a leaf's ``.grad`` for anyone. ``forward`` mode computes no
gradient, so ``inplace`` changes nothing there and klanneal-inplace is not run
in that mode.

Peak memory: CPU rows run each provider in its own process (this module with
``--worker``); CUDA rows measure in-process. See _harness for the methods.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402

PROVIDERS = ("eager", "compile", "klanneal", "klanneal-inplace", "liger")
MODES = ("forward", "full")
MEMCPY = "memcpy"
BETA = 0.5


@dataclass(frozen=True)
class Case:
    """One benchmark shape. recon_shape is [B, ..., V] for categorical, [B, features] else."""

    name: str
    title: str
    likelihood: str
    recon_shape: tuple[int, ...]
    latent_dim: int
    quick_recon_shape: tuple[int, ...]
    quick_latent_dim: int

    def shape(self, quick: bool) -> tuple[tuple[int, ...], int]:
        if quick:
            return self.quick_recon_shape, self.quick_latent_dim
        return self.recon_shape, self.latent_dim


# Quick shapes are tiny and deliberately odd (V not a multiple of a SIMD width).
CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("text", "text VAE, PTB-like", "categorical", (32, 40, 10000), 32, (4, 16, 1031), 8),
        Case(
            "large-vocab",
            "large vocabulary, GPT-2 sized decoder",
            "categorical",
            (16, 64, 50257),
            32,
            (2, 8, 2053),
            8,
        ),
        Case("image", "image VAE, 28x28 pixels", "bernoulli", (128, 784), 16, (8, 64), 4),
        Case("continuous", "continuous data", "gaussian", (256, 4096), 64, (8, 128), 8),
    )
}


def dtypes_for(device: torch.device) -> tuple[torch.dtype, ...]:
    """fp32 on the CPU; fp32 and bf16 on CUDA."""
    return (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)


def liger_available() -> bool:
    """Whether Liger-Kernel can be benchmarked here (it needs CUDA and Triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss  # noqa: F401
    except ImportError:
        return False
    return True


def applicable(provider: str, case: Case, device: torch.device, mode: str) -> bool:
    """Whether ``provider`` has a meaning for this case, device and mode."""
    if provider == "klanneal-inplace":
        return mode == "full" and case.likelihood == "categorical"
    if provider == "liger":
        return case.likelihood == "categorical" and device.type == "cuda" and liger_available()
    return True


class _DecoderStandIn(torch.autograd.Function):
    """The decoder's last layer as the loss sees it (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return base.clone()

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        # The gradient was computed by the loss (that is what is timed); a
        # decoder would consume it here. The anchor's gradient is a scalar.
        return grad_logits.new_zeros(()), None


@dataclass
class Inputs:
    recon_base: torch.Tensor  # [B, ..., V] or [B, features]
    target: torch.Tensor  # int64 [B, ...] or like recon_base
    mu: torch.Tensor  # [B, D]
    logvar: torch.Tensor  # [B, D]
    beta: torch.Tensor  # 0-d
    anchor: torch.Tensor  # 0-d leaf, the stand-in decoder's "parameter"


def make_inputs(
    case: Case, quick: bool, device: torch.device, dtype: torch.dtype, requires_grad: bool
) -> Inputs:
    """Random inputs with the case's shapes, generated on the CPU with a fixed seed."""
    recon_shape, latent_dim = case.shape(quick)
    generator = torch.Generator().manual_seed(0)
    batch = recon_shape[0]
    recon = 2.0 * torch.randn(recon_shape, generator=generator)
    if case.likelihood == "categorical":
        target = torch.randint(0, recon_shape[-1], recon_shape[:-1], generator=generator)
    elif case.likelihood == "bernoulli":
        # Binarised pixels, mostly background, like binarised MNIST.
        target = (torch.rand(recon_shape, generator=generator) < 0.2).to(dtype)
    else:
        target = torch.randn(recon_shape, generator=generator).to(dtype)
    mu = 0.5 * torch.randn(batch, latent_dim, generator=generator)
    logvar = 0.5 * torch.randn(batch, latent_dim, generator=generator)
    return Inputs(
        recon_base=recon.to(device=device, dtype=dtype),
        target=target.to(device),
        mu=mu.to(device=device, dtype=dtype).requires_grad_(requires_grad),
        logvar=logvar.to(device=device, dtype=dtype).requires_grad_(requires_grad),
        beta=torch.tensor(BETA, device=device),
        anchor=torch.zeros((), device=device, dtype=dtype, requires_grad=requires_grad),
    )


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any]


def _liger_loss(likelihood: str) -> LossFn:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    cross_entropy = LigerCrossEntropyLoss(reduction="sum", ignore_index=-100)

    def loss(recon, target, mu, logvar, beta):
        recon_sum = cross_entropy(recon.reshape(-1, recon.shape[-1]), target.reshape(-1))
        kl = (-0.5 * (1 + logvar - mu * mu - logvar.exp())).sum()
        return (recon_sum + beta * kl) / mu.shape[0]

    return loss


def handwritten_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: torch.Tensor,
    likelihood: str,
) -> torch.Tensor:
    """(sum of the reconstruction NLL + beta * KL) / B, written the way users
    write it: torch's fused loss for the reconstruction, the KL in closed form.
    The gaussian likelihood has unit variance: 0.5 * (x - y)^2 + 0.5 log(2 pi)."""
    import torch.nn.functional as F

    if likelihood == "categorical":
        rec = F.cross_entropy(recon.reshape(-1, recon.shape[-1]), target.reshape(-1),
                              reduction="sum")  # fmt: skip
    elif likelihood == "bernoulli":
        rec = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    elif likelihood == "gaussian":
        rec = 0.5 * F.mse_loss(recon, target, reduction="sum") + 0.5 * recon.numel() * LOG_2PI
    else:
        rec = F.mse_loss(recon, target, reduction="sum")
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum()
    return (rec + beta * kl) / mu.shape[0]


LOG_2PI = 1.8378770664093453


def loss_function(provider: str, likelihood: str, compiled_ref: Optional[Callable]) -> LossFn:
    """The provider's loss as ``f(recon, target, mu, logvar, beta) -> 0-d loss tensor``."""
    import klanneal

    if provider == "eager":
        return lambda r, t, m, lv, b: handwritten_loss(r, t, m, lv, b, likelihood)
    if provider == "compile":
        assert compiled_ref is not None
        return lambda r, t, m, lv, b: compiled_ref(r, t, m, lv, b, likelihood)
    if provider in ("klanneal", "klanneal-inplace"):
        inplace = provider == "klanneal-inplace"
        return lambda r, t, m, lv, b: (
            klanneal.elbo_loss(r, t, m, lv, beta=b, likelihood=likelihood, inplace=inplace).loss
        )
    if provider == "liger":
        return _liger_loss(likelihood)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def build_entry(
    provider: str, inputs: Inputs, likelihood: str, mode: str, compiled_ref: Optional[Callable]
) -> _harness.Timed:
    """The timed call of one provider (or of the memcpy limit) in one mode."""
    if provider == MEMCPY:
        destination = torch.empty_like(inputs.recon_base)
        return _harness.Timed(MEMCPY, lambda _: destination.copy_(inputs.recon_base))

    loss_fn = loss_function(provider, likelihood, compiled_ref)
    if mode == "forward":

        def forward(logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return loss_fn(logits, inputs.target, inputs.mu, inputs.logvar, inputs.beta)

        # A fresh copy here too: every timed call of every provider starts from
        # freshly written logits, and a provider that writes into its input
        # (Liger's cross-entropy does) cannot alter the others' inputs.
        return _harness.Timed(provider, forward, setup=inputs.recon_base.clone)

    def fresh_logits() -> torch.Tensor:
        inputs.anchor.grad = None
        inputs.mu.grad = None
        inputs.logvar.grad = None
        return _DecoderStandIn.apply(inputs.anchor, inputs.recon_base)

    def full(logits: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(logits, inputs.target, inputs.mu, inputs.logvar, inputs.beta)
        loss.backward()
        return loss.detach()

    return _harness.Timed(provider, full, setup=fresh_logits)


def make_compiled_ref() -> Callable:
    """A fresh torch.compile of the hand-written loss; shapes are static within a case."""
    return torch.compile(handwritten_loss, dynamic=False)


def _dynamo_graph_breaks() -> Optional[int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(sum(counters["graph_break"].values()))


def _reset_dynamo() -> None:
    torch._dynamo.reset()
    try:
        from torch._dynamo.utils import counters

        counters.clear()
    except ImportError:
        pass


# --------------------------------------------------------------------------- memory


def _worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: warms one provider up, then measures its peak memory."""
    case = CASES[spec["case"]]
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    mode = spec["mode"]
    inputs = make_inputs(case, spec["quick"], device, dtype, requires_grad=mode == "full")
    compiled_ref = make_compiled_ref() if spec["provider"] == "compile" else None
    entry = build_entry(spec["provider"], inputs, case.likelihood, mode, compiled_ref)
    samples = _harness.cpu_peak_samples(entry, spec["samples"])
    return {
        "peak_extra_bytes": max(samples),
        "samples": samples,
        "threads": torch.get_num_threads(),
    }


def measure_cpu_memory(spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Runs ``_worker_main(spec)`` in a subprocess; returns its result or an ``error``."""
    return _harness.run_memory_worker(__file__, spec, timeout_s)


# --------------------------------------------------------------------------- suite


def run(
    *,
    cases: list[str],
    providers: list[str],
    modes: list[str],
    devices: list[torch.device],
    repeats: int,
    warmup: int,
    quick: bool,
    memory: bool,
    memory_samples: int = 3,
    log: Callable[[str], None] = print,
    failures: Optional[list[str]] = None,
) -> list[dict[str, Any]]:
    """Times (and optionally measures the memory of) every provider on every case.

    In quick mode, torch.compile (the slow part) runs only on the first case,
    and memory is measured only on the first case in full mode, for every
    provider but compile, to keep the smoke run short.

    Args:
        failures: receives one message per provider that failed its checked
            first call (that provider is then left out of its group).

    Returns:
        One dict per (case, device, dtype, mode, provider), the memcpy limit
        included as provider "memcpy".
    """
    if failures is None:
        failures = []
    rows: list[dict[str, Any]] = []
    for device in devices:
        for dtype in dtypes_for(device):
            for case_index, case_name in enumerate(cases):
                case = CASES[case_name]
                first_case = case_index == 0
                compiled_ref = None
                if "compile" in providers:
                    _reset_dynamo()
                    compiled_ref = make_compiled_ref()
                for mode in modes:
                    chosen = [
                        p
                        for p in providers
                        if applicable(p, case, device, mode)
                        and not (p == "compile" and quick and not first_case)
                    ]
                    rows += _run_group(
                        case,
                        device,
                        dtype,
                        mode,
                        chosen,
                        compiled_ref,
                        repeats=repeats,
                        warmup=warmup,
                        quick=quick,
                        memory=memory and (not quick or (first_case and mode == "full")),
                        # A compile worker compiles again (~10 s cold): not in the smoke run.
                        memory_providers=[p for p in chosen if not (quick and p == "compile")],
                        memory_samples=memory_samples,
                        log=log,
                        failures=failures,
                    )
    return rows


def _run_group(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    providers: list[str],
    compiled_ref: Optional[Callable],
    *,
    repeats: int,
    warmup: int,
    quick: bool,
    memory: bool,
    memory_providers: list[str],
    memory_samples: int,
    log: Callable[[str], None],
    failures: list[str],
) -> list[dict[str, Any]]:
    dtype_name = str(dtype).removeprefix("torch.")
    label = f"{case.name} {device.type} {dtype_name} {mode}"
    inputs = make_inputs(case, quick, device, dtype, requires_grad=mode == "full")
    # One checked call each (this also compiles): a provider that computes a
    # different loss would make its timing meaningless. A provider that fails
    # here (no Triton for torch.compile on a GPU, say) is reported and left
    # out, so that one failure does not lose the whole run.
    entries: list[_harness.Timed] = []
    losses: dict[str, float] = {}
    for provider in providers:
        log(f"[{label}] warm-up {provider}")
        try:
            entry = build_entry(provider, inputs, case.likelihood, mode, compiled_ref)
            losses[provider] = float(entry.call(entry.prepare()))
        except Exception as error:
            message = f"{label}: {provider} failed: {type(error).__name__}: {error}"
            log(message)
            failures.append(message)
            continue
        entries.append(entry)
    entries.append(build_entry(MEMCPY, inputs, case.likelihood, mode, compiled_ref))
    names = [entry.name for entry in entries]
    memory_providers = [p for p in memory_providers if p in names]
    log(f"[{label}] timing {', '.join(names)} ({repeats} repeats, round-robin)")
    times = _harness.time_round_robin(entries, device, repeats=repeats, warmup=warmup)

    memory_results = {}
    if memory:
        log(f"[{label}] peak memory of {', '.join(memory_providers)}")
        memory_results = _measure_memory(
            case, device, dtype_name, mode, memory_providers, entries, quick, memory_samples
        )

    recon_shape, latent_dim = case.shape(quick)
    logits_bytes = inputs.recon_base.nelement() * inputs.recon_base.element_size()
    reference_loss = losses.get("eager")
    rows = []
    for name in names:
        row: dict[str, Any] = {
            "case": case.name,
            "title": case.title,
            "likelihood": case.likelihood,
            "recon_shape": list(recon_shape),
            "latent_dim": latent_dim,
            "device": device.type,
            "dtype": dtype_name,
            "mode": mode,
            "provider": name,
            **_harness.summarize_times(times[name]),
            "repeats": len(times[name]),
            "logits_bytes": logits_bytes,
            "peak_extra_bytes": None,
            "memory_method": None,
            "loss": losses.get(name),
            "loss_rel_diff_vs_eager": None,
        }
        if name in losses and reference_loss is not None:
            scale = max(abs(reference_loss), 1e-30)
            row["loss_rel_diff_vs_eager"] = abs(losses[name] - reference_loss) / scale
        if name == "compile":
            row["compile_graph_breaks"] = _dynamo_graph_breaks()
        if name in memory_results:
            row.update(memory_results[name])
            log(f"[{label}] memory {name}: {_format_memory(row)}")
        rows.append(row)
    return rows


def _measure_memory(
    case: Case,
    device: torch.device,
    dtype_name: str,
    mode: str,
    providers: list[str],
    entries: list[_harness.Timed],
    quick: bool,
    samples: int,
) -> dict[str, dict[str, Any]]:
    """Peak extra memory of each provider's call: the max over ``samples`` measured calls.

    CUDA: in this process, one provider after the other. CPU: one worker
    process per provider, run a few at a time (each measures only itself).
    """
    if device.type == "cuda":
        results = {}
        for provider in providers:
            entry = next(e for e in entries if e.name == provider)
            peak = max(
                _harness.cuda_peak_extra_bytes(entry.call, entry.prepare(), device)
                for _ in range(samples)
            )
            results[provider] = {
                "peak_extra_bytes": peak,
                "memory_method": _harness.CUDA_MEMORY_METHOD,
            }
        return results
    specs = [
        {
            "case": case.name,
            "quick": quick,
            "device": device.type,
            "dtype": dtype_name,
            "mode": mode,
            "provider": provider,
            "samples": samples,
        }
        for provider in providers
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(len(specs), os.cpu_count() or 1))) as pool:
        outcomes = list(pool.map(measure_cpu_memory, specs))
    results = {}
    for provider, outcome in zip(providers, outcomes):
        if "error" in outcome:
            results[provider] = {
                "memory_error": outcome["error"],
                "memory_method": _harness.CPU_MEMORY_METHOD,
            }
        else:
            results[provider] = {
                "peak_extra_bytes": outcome["peak_extra_bytes"],
                "memory_samples_bytes": outcome["samples"],
                "memory_worker_threads": outcome["threads"],
                "memory_method": _harness.CPU_MEMORY_METHOD,
            }
    return results


def _format_memory(row: dict[str, Any]) -> str:
    if row.get("peak_extra_bytes") is None:
        return f"unavailable ({row.get('memory_error', 'not measured')})"
    ratio = row["peak_extra_bytes"] / row["logits_bytes"]
    return f"{row['peak_extra_bytes'] / 2**20:.1f} MiB = {ratio:.2f}x logits"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="JSON", help="internal: measure one provider's memory")
    args = parser.parse_args(argv)
    if args.worker is None:
        parser.error("run the suite through benchmarks/run.py; this module only has --worker")
    print(json.dumps(_worker_main(json.loads(args.worker))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
