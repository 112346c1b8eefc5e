"""Benchmark of the count likelihoods (issue 24): scvi-tools' loss by hand vs torch.compile
vs klanneal.elbo_loss, and an scVI-like training step with each.

Providers (side by side, timed round-robin in one process, forward + backward):
  eager     ``handwritten_loss``: scvi-tools' ``log_zinb_positive`` / ``log_nb_positive``
            (transcribed in _scvi_loss.py, with the eps = 1e-8 scvi-tools passes), the
            reconstruction -log p summed over genes, + beta * the closed-form Gaussian
            KL, the mean over cells: scvi-tools' ``VAE.loss``, which is klanneal's
            default reduction "batchmean"
  compile   torch.compile(handwritten_loss, dynamic=False), warmed up before timing
  klanneal  klanneal.elbo_loss(px_rate, x, mu, logvar, beta, likelihood=
            ZeroInflatedNegativeBinomial(theta, zi_logits)) (NegativeBinomial(theta) for
            NB): the op klanneal::count_nll, its native CPU / CUDA kernel

Cases (fp32, B=128 cells, latent 10): ``zinb-2k``, ``zinb-20k``, ``nb-2k``, ``nb-20k``
(G = 2000 or 20000 genes), and ``scvi-step``: one Adam step of the scVI-like VAE of
examples/single_cell_vae (encoder on log1p counts, decoder softmax x library -> px_rate,
per-gene theta = exp(px_r), zi_logits head) on B=128 cells x G=20000 genes, with each
provider's ZINB loss under a linear KL warm-up (klanneal: through ``klanneal.nn.ELBOLoss``).

Inputs (seeded): px_rate = softmax(decoder logits) * library size, theta = exp(px_r) [G],
zi_logits [B, G], with the spreads of the example's synthetic data
(examples/single_cell_vae/data.py); the counts are drawn from the case's own distribution
(a gamma-Poisson mixture, zeroed with probability sigmoid(zi_logits) for ZINB), so their
sparsity is the model's: ~70% zeros at G=2000, ~95% at G=20000 (row ``zero_fraction``).
As in bench_elbo, px_rate and zi_logits are outputs of ``bench_elbo._DecoderStandIn``
(their gradients are computed and dropped, as the decoder's matmul would consume them);
theta = px_r.exp() is formed before the timed call, and its gradient reaches px_r.grad.

Agreement: before timing, every provider's loss and its gradients with respect to
px_rate, theta, zi_logits, mu and logvar are compared with eager's (assert_close, with
eager's own fp32 rounding error, measured against eager in float64, allowed a few times
over); a provider that disagrees is reported as failed and left out.

Peak memory: CPU rows run each provider in its own process (this module with
``--worker``); CUDA rows measure in-process (see _harness). Not measured for the step.

Rows: the ELBO rows' fields (``case``, ``provider``, ``median_ms``, ``logits_bytes`` =
px_rate's size, ``peak_extra_bytes``, ``loss_rel_diff_vs_eager``, ...) with ``family``
"counts"; the step's ``mode`` is "step". _report_counts renders them and judges issue
24's targets.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _harness  # noqa: E402
import bench_elbo  # noqa: E402
from _scvi_loss import handwritten_loss  # noqa: E402
from single_cell_vae import data as example_data  # noqa: E402
from single_cell_vae.model import SingleCellVAE  # noqa: E402

PROVIDERS = ("eager", "compile", "klanneal")
FAMILY = "counts"
MODE = "full"
STEP_CASE = "scvi-step"
BETA = 0.5
LATENT = 10
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-3  # fp32: scvi-tools' lgamma(x + theta) - lgamma(theta) cancels digits
GRAD_ATOL = 1e-4  # times the largest |gradient| of the tensor
ROUNDING_SLACK = 4.0  # times eager's fp32 rounding error, measured against float64


@dataclass(frozen=True)
class Case:
    """B cells x G genes of one family ("zinb" or "nb"); quick: tiny, odd shapes."""

    name: str
    family: str
    batch: int
    genes: int
    quick_batch: int
    quick_genes: int

    def shape(self, quick: bool) -> tuple[int, int]:
        return (self.quick_batch, self.quick_genes) if quick else (self.batch, self.genes)

    def title(self, quick: bool) -> str:
        batch, genes = self.shape(quick)
        return f"{self.family.upper()} B={batch} G={genes}"


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("zinb-2k", "zinb", 128, 2000, 8, 401),
        Case("zinb-20k", "zinb", 128, 20000, 8, 1031),
        Case("nb-2k", "nb", 128, 2000, 8, 401),
        Case("nb-20k", "nb", 128, 20000, 8, 1031),
    )
}
STEP_SHAPE, STEP_QUICK_SHAPE = (128, 20000), (16, 401)  # cells, genes (issue 24's G=20000)


# --------------------------------------------------------------------------- the losses


def klanneal_loss(px_rate, counts, theta, zi_logits, mu, logvar, beta):
    """klanneal.elbo_loss with the count likelihood (reduction "batchmean", its default)."""
    import klanneal
    from klanneal.likelihoods import NegativeBinomial, ZeroInflatedNegativeBinomial

    if zi_logits is None:
        likelihood: Any = NegativeBinomial(theta)
    else:
        likelihood = ZeroInflatedNegativeBinomial(theta, zi_logits)
    return klanneal.elbo_loss(px_rate, counts, mu, logvar, beta, likelihood=likelihood).loss


LossFn = Callable[..., torch.Tensor]


def loss_function(provider: str, compiled: Optional[LossFn]) -> LossFn:
    """``f(px_rate, counts, theta, zi_logits or None, mu, logvar, beta) -> 0-d loss``."""
    if provider == "eager":
        return handwritten_loss
    if provider == "compile":
        assert compiled is not None
        return compiled
    if provider == "klanneal":
        return klanneal_loss
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_compiled() -> LossFn:
    """A fresh torch.compile of the hand-written loss; shapes are static within a case."""
    return torch.compile(handwritten_loss, dynamic=False)


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    rate_base: torch.Tensor  # [B, G] px_rate, > 0
    zi_base: Optional[torch.Tensor]  # [B, G] zi_logits (ZINB only)
    px_r: torch.Tensor  # [G] leaf, theta = exp(px_r)
    counts: torch.Tensor  # [B, G] float32 whole numbers >= 0
    mu: torch.Tensor  # [B, LATENT] leaf
    logvar: torch.Tensor  # [B, LATENT] leaf
    beta: torch.Tensor  # 0-d
    anchor: torch.Tensor  # 0-d leaf, the stand-in decoder's "parameter"


def make_inputs(case: Case, quick: bool, device: torch.device) -> Inputs:
    """The case's inputs, drawn on the CPU from one seeded numpy Generator."""
    batch, genes = case.shape(quick)
    d = example_data
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, d.BASELINE_SD, genes) + 0.5 * rng.normal(size=(batch, genes))
    share = np.exp(logits - logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)
    library = np.exp(rng.normal(d.LIBRARY_LOG_MEAN, d.LIBRARY_LOG_SD, (batch, 1)))
    px_rate = library * share
    px_r = rng.normal(d.THETA_LOG_MEAN, d.THETA_LOG_SD, genes)
    theta = np.exp(px_r)
    counts = rng.poisson(rng.gamma(theta, px_rate / theta))
    zi_logits = None
    if case.family == "zinb":
        zi_logits = rng.normal(d.DROPOUT_LOGIT_MEAN, d.DROPOUT_LOGIT_SD, (batch, genes))
        counts[rng.random(counts.shape) < 1.0 / (1.0 + np.exp(-zi_logits))] = 0
    mu = 0.5 * rng.normal(size=(batch, LATENT))
    logvar = 0.5 * rng.normal(size=(batch, LATENT))

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

    return Inputs(
        rate_base=f32(px_rate),
        zi_base=None if zi_logits is None else f32(zi_logits),
        px_r=f32(px_r).requires_grad_(),
        counts=f32(counts),
        mu=f32(mu).requires_grad_(),
        logvar=f32(logvar).requires_grad_(),
        beta=torch.tensor(BETA, device=device),
        anchor=torch.zeros((), device=device, requires_grad=True),
    )


def build_entry(provider: str, inputs: Inputs, compiled: Optional[LossFn]) -> _harness.Timed:
    """One forward + backward of ``provider``; fresh px_rate / zi_logits / theta before it."""
    loss_fn = loss_function(provider, compiled)
    stand_in = bench_elbo._DecoderStandIn.apply

    def fresh() -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        for leaf in (inputs.px_r, inputs.mu, inputs.logvar, inputs.anchor):
            leaf.grad = None
        zi = None if inputs.zi_base is None else stand_in(inputs.anchor, inputs.zi_base)
        return stand_in(inputs.anchor, inputs.rate_base), inputs.px_r.exp(), zi

    def full(state: tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
        px_rate, theta, zi_logits = state
        loss = loss_fn(
            px_rate, inputs.counts, theta, zi_logits, inputs.mu, inputs.logvar, inputs.beta
        )
        loss.backward()
        return loss.detach()

    return _harness.Timed(provider, full, setup=fresh)


def loss_and_gradients(loss_fn: LossFn, inputs: Inputs) -> tuple[torch.Tensor, dict]:
    """The loss and its gradients w.r.t. px_rate, theta, zi_logits, mu, logvar (as leaves)."""
    wrt = {
        "px_rate": inputs.rate_base.clone().requires_grad_(),
        "theta": inputs.px_r.detach().exp().requires_grad_(),
        "mu": inputs.mu,
        "logvar": inputs.logvar,
    }
    if inputs.zi_base is not None:
        wrt["zi_logits"] = inputs.zi_base.clone().requires_grad_()
    loss = loss_fn(
        wrt["px_rate"], inputs.counts, wrt["theta"], wrt.get("zi_logits"), wrt["mu"],
        wrt["logvar"], inputs.beta,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, list(wrt.values()))
    return loss.detach(), dict(zip(wrt, grads))


Result = tuple[torch.Tensor, dict]  # (loss, {name: gradient}) from loss_and_gradients


def _float64(inputs: Inputs) -> Inputs:
    def f64(t: Optional[torch.Tensor]) -> Any:
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    return Inputs(**{f.name: f64(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})


def eager_reference(inputs: Inputs) -> tuple[Result, dict[str, float]]:
    """eager's fp32 loss and gradients, and the largest difference of each from eager in
    float64: the fp32 rounding error of scvi-tools' formula on these inputs (the theta
    gradient, a sum over cells of terms that cancel, has the most)."""
    fp32 = loss_and_gradients(handwritten_loss, inputs)
    fp64 = loss_and_gradients(handwritten_loss, _float64(inputs))
    error = {"loss": float((fp32[0].double() - fp64[0]).abs())}
    error.update({k: float((g.double() - fp64[1][k]).abs().max()) for k, g in fp32[1].items()})
    return fp32, error


def assert_agrees(got: Result, want: Result, rounding: dict[str, float]) -> None:
    """A provider's loss and gradients against eager's, allowing ROUNDING_SLACK times
    eager's own rounding error on top of the tolerances (AssertionError names the tensor)."""
    torch.testing.assert_close(
        got[0], want[0], rtol=LOSS_RTOL, atol=ROUNDING_SLACK * rounding["loss"],
        msg=lambda m: f"loss: {m}",
    )  # fmt: skip
    for name, expected in want[1].items():
        atol = GRAD_ATOL * float(expected.abs().max()) + ROUNDING_SLACK * rounding[name]
        torch.testing.assert_close(
            got[1][name], expected, rtol=GRAD_RTOL, atol=atol,
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )  # fmt: skip


# --------------------------------------------------------------------------- memory


def _worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: warms one provider up, then measures its peak memory."""
    inputs = make_inputs(CASES[spec["case"]], spec["quick"], torch.device(spec["device"]))
    compiled = make_compiled() if spec["provider"] == "compile" else None
    entry = build_entry(spec["provider"], inputs, compiled)
    samples = _harness.cpu_peak_samples(entry, spec["samples"])
    threads = torch.get_num_threads()
    return {"peak_extra_bytes": max(samples), "samples": samples, "threads": threads}


def _measure_memory(
    case: Case, device: torch.device, quick: bool, entries: list[_harness.Timed], samples: int
) -> dict[str, dict[str, Any]]:
    """Peak extra memory of each entry's call, the max over ``samples`` measured calls.

    CUDA: in this process. CPU: one worker process per provider, one at a time
    (two at once would share the cores and each other's page faults)."""
    results: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if device.type == "cuda":
            peak = max(
                _harness.cuda_peak_extra_bytes(entry.call, entry.prepare(), device)
                for _ in range(samples)
            )
            results[entry.name] = {
                "peak_extra_bytes": peak,
                "memory_method": _harness.CUDA_MEMORY_METHOD,
            }
            continue
        spec = {"case": case.name, "quick": quick, "device": device.type,
                "provider": entry.name, "samples": samples}  # fmt: skip
        outcome = _harness.run_memory_worker(__file__, spec)
        results[entry.name] = {"memory_method": _harness.CPU_MEMORY_METHOD}
        if "error" in outcome:
            results[entry.name]["memory_error"] = outcome["error"]
        else:
            results[entry.name].update(
                peak_extra_bytes=outcome["peak_extra_bytes"],
                memory_samples_bytes=outcome["samples"],
                memory_worker_threads=outcome["threads"],
            )
    return results


# --------------------------------------------------------------------------- suite


def _row(
    case: str, title: str, mode: str, device: torch.device, provider: str,
    seconds: list[float], **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "case": case,
        "family": FAMILY,
        "title": title,
        "device": device.type,
        "dtype": "float32",
        "mode": mode,
        "provider": provider,
        **_harness.summarize_times(seconds),
        "repeats": len(seconds),
        "peak_extra_bytes": None,
        "memory_method": None,
        **fields,
    }


def _fields(family: str, counts: torch.Tensor) -> dict[str, Any]:
    """The row fields that describe a case's inputs; ``klanneal_native``: whether klanneal
    runs the count op's native kernel on the CPU (else its pure-PyTorch reference)."""
    from klanneal._count_op import native_count_kernel

    batch, genes = counts.shape
    return {
        "likelihood": family,
        "recon_shape": [batch, genes],
        "latent_dim": LATENT,
        "logits_bytes": counts.numel() * 4,  # px_rate's size
        "zero_fraction": float((counts == 0).float().mean()),
        "klanneal_native": native_count_kernel(torch.device("cpu")),
    }


def _rel_diff(losses: dict[str, float], provider: str) -> Optional[float]:
    if "eager" not in losses or provider not in losses:
        return None
    return abs(losses[provider] - losses["eager"]) / max(abs(losses["eager"]), 1e-30)


def _checked(
    label: str, provider: str, check: Callable[[], float], log: Callable[[str], None],
    failures: list[str],
) -> Optional[float]:  # fmt: skip
    """``check()`` (the provider's first calls, compared with eager's): its loss, or
    None after reporting the failure (one provider's failure does not lose the run)."""
    log(f"[{label}] warm-up and check {provider}")
    try:
        return check()
    except Exception as error:
        message = f"{label}: {provider} failed: {type(error).__name__}: {error}"
        log(message.splitlines()[0])
        failures.append(message)
        return None


def _fresh_compiled(providers: list[str]) -> Optional[LossFn]:
    """A fresh torch.compile of the hand-written loss, dynamo's caches and counters reset
    first (each case has its own shapes), or None without the compile provider."""
    if "compile" not in providers:
        return None
    bench_elbo._reset_dynamo()
    return make_compiled()


def _time(
    label: str, entries: list[_harness.Timed], device: torch.device, repeats: int,
    warmup: int, log: Callable[[str], None],
) -> dict[str, list[float]]:  # fmt: skip
    log(f"[{label}] timing {', '.join(e.name for e in entries)} ({repeats} repeats, round-robin)")
    return _harness.time_round_robin(entries, device, repeats, warmup)


def _run_case(
    case: Case, device: torch.device, providers: list[str], *, repeats: int, warmup: int,
    quick: bool, memory: bool, memory_samples: int, log: Callable[[str], None],
    failures: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    label = f"{case.name} {device.type} float32 {MODE}"
    inputs = make_inputs(case, quick, device)
    compiled = _fresh_compiled(providers)
    reference: list[tuple[Result, dict[str, float]]] = []
    entries, losses = [], {}
    for provider in providers:

        def check(provider: str = provider) -> float:
            if provider == "eager":
                reference.append(eager_reference(inputs))
                result = reference[0][0]
            else:
                result = loss_and_gradients(loss_function(provider, compiled), inputs)
                if reference:
                    assert_agrees(result, *reference[0])
            entry = build_entry(provider, inputs, compiled)
            entry.call(entry.prepare())  # the timed graph (torch.compile compiles it here)
            entries.append(entry)
            return float(result[0])

        loss = _checked(label, provider, check, log, failures)
        if loss is not None:
            losses[provider] = loss
    times = _time(label, entries, device, repeats, warmup, log)
    measured: dict[str, dict[str, Any]] = {}
    if memory:
        chosen = [e for e in entries if not (quick and e.name == "compile")]
        log(f"[{label}] peak memory of {', '.join(e.name for e in chosen)}")
        measured = _measure_memory(case, device, quick, chosen, memory_samples)
    fields = _fields(case.family, inputs.counts)
    rows = []
    for name, seconds in times.items():
        extra = {"loss": losses[name], "loss_rel_diff_vs_eager": _rel_diff(losses, name)}
        if name == "compile":
            extra["compile_graph_breaks"] = bench_elbo._dynamo_graph_breaks()
        rows.append(_row(case.name, case.title(quick), MODE, device, name, seconds,
                         **fields, **extra, **measured.get(name, {})))  # fmt: skip
    return rows


def _step_outputs(model: SingleCellVAE, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(px_rate, theta, zi_logits, qz_m, qz_logvar): SingleCellVAE.forward's computation,
    with z's noise drawn on the counts' device (forward draws it on the CPU)."""
    qz_m, qz_logvar = model.encode(counts)
    z = qz_m + torch.exp(0.5 * qz_logvar) * torch.randn_like(qz_m)
    px_rate, px_dropout = model.decode(z, counts.sum(dim=-1, keepdim=True).clamp_min(1.0))
    return px_rate, model.theta(), px_dropout, qz_m, qz_logvar


STEP_KL_WARMUP = 400  # steps of the training step's linear KL warm-up (beta 0 -> 1)


def _warmed_up_loss(provider: str, loss_fn: LossFn, device: torch.device) -> LossFn:
    """``f(px_rate, counts, theta, zi_logits, mu, logvar) -> 0-d loss`` with beta on a
    linear KL warm-up (klanneal.schedules.LinearWarmup(STEP_KL_WARMUP)), one step per
    call: klanneal through ``klanneal.nn.ELBOLoss`` (its likelihood's tensors set per
    call, as examples/single_cell_vae does), the hand-written loss with the same
    schedule's value in a 0-d tensor (a new value is not a torch.compile recompile)."""
    import klanneal
    from klanneal.likelihoods import ZeroInflatedNegativeBinomial

    schedule = klanneal.schedules.LinearWarmup(STEP_KL_WARMUP)
    if provider == "klanneal":
        criterion = klanneal.nn.ELBOLoss(schedule, likelihood=ZeroInflatedNegativeBinomial())

        def fused(px_rate, counts, theta, zi_logits, mu, logvar):
            criterion.likelihood = ZeroInflatedNegativeBinomial(theta, zi_logits)
            loss = criterion(px_rate, counts, mu, logvar).loss
            criterion.step()
            return loss

        return fused
    beta, step = torch.zeros((), device=device), [0]

    def by_hand(px_rate, counts, theta, zi_logits, mu, logvar):
        beta.fill_(schedule(step[0]))
        step[0] += 1
        return loss_fn(px_rate, counts, theta, zi_logits, mu, logvar, beta)

    return by_hand


def step_case(
    device: torch.device, providers: list[str], *, repeats: int, warmup: int, quick: bool,
    log: Callable[[str], None], failures: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """One Adam step of the scVI-like VAE (ZINB, B=128, G=20000) with each provider's
    loss under a linear KL warm-up (_warmed_up_loss), one model per provider from the
    same initial weights. Checked first: each provider's loss on one forward pass of
    those weights at beta BETA, against eager's."""
    batch, genes = STEP_QUICK_SHAPE if quick else STEP_SHAPE
    counts = example_data.make_counts(batch, genes, n_types=5, seed=0).counts.to(device)
    beta = torch.tensor(BETA, device=device)
    compiled = _fresh_compiled(providers)
    torch.manual_seed(0)
    initial = SingleCellVAE(genes, n_latent=LATENT).to(device)
    shared = _step_outputs(initial, counts)
    label = f"{STEP_CASE} {device.type} float32"
    entries, losses = [], {}
    for provider in providers:
        model = SingleCellVAE(genes, n_latent=LATENT).to(device)
        model.load_state_dict(initial.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = loss_function(provider, compiled)

        warmed = _warmed_up_loss(provider, loss_fn, device)

        def step(_: Any, model=model, opt=opt, warmed=warmed) -> torch.Tensor:
            px_rate, theta, zi_logits, qz_m, qz_logvar = _step_outputs(model, counts)
            loss = warmed(px_rate, counts, theta, zi_logits, qz_m, qz_logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        def check(provider: str = provider, loss_fn=loss_fn, step=step) -> float:
            px_rate, theta, zi_logits, qz_m, qz_logvar = shared
            loss = loss_fn(px_rate, counts, theta, zi_logits, qz_m, qz_logvar, beta).detach()
            if "eager" in losses:
                want = torch.tensor(losses["eager"], device=device)
                torch.testing.assert_close(loss, want, rtol=LOSS_RTOL, atol=0)
            step(None)
            entries.append(_harness.Timed(provider, step))
            return float(loss)

        loss = _checked(label, provider, check, log, failures)
        if loss is not None:
            losses[provider] = loss
    title = f"scVI-like training step, ZINB, B={batch} G={genes}"
    fields = _fields("zinb", counts)
    times = _time(label, entries, device, repeats, warmup, log)
    return [_row(STEP_CASE, title, "step", device, name, seconds, **fields, loss=losses[name],
                 loss_rel_diff_vs_eager=_rel_diff(losses, name))
            for name, seconds in times.items()]  # fmt: skip


ALL_CASES = (*CASES, STEP_CASE)


def run(
    *,
    cases: Optional[list[str]] = None,
    providers: tuple[str, ...] | list[str] = PROVIDERS,
    devices: Optional[list[torch.device]] = None,
    repeats: int = 10,
    warmup: int = 2,
    quick: bool = False,
    memory: bool = True,
    memory_samples: int = 2,
    log: Callable[[str], None] = print,
    failures: Optional[list[str]] = None,
) -> list[dict[str, Any]]:
    """Times every provider on every case and device (fp32, forward + backward) and,
    with ``memory``, measures each one's peak extra memory (not the step's).

    Quick: tiny shapes; torch.compile on the first case only (not in the step);
    memory of the first case only, without compile.

    Args:
        cases: names from ALL_CASES (default: all).
        failures: receives one message per provider that failed or disagreed with
            eager in its checked first call (it is then left out of its case).
    """
    failures = [] if failures is None else failures
    chosen_cases = list(ALL_CASES) if cases is None else cases
    rows: list[dict[str, Any]] = []
    for device in devices or [torch.device("cpu")]:
        for index, name in enumerate(c for c in chosen_cases if c in CASES):
            rows += _run_case(
                CASES[name], device,
                [p for p in providers if not (quick and p == "compile" and index > 0)],
                repeats=repeats, warmup=warmup, quick=quick,
                memory=memory and (not quick or index == 0), memory_samples=memory_samples,
                log=log, failures=failures,
            )  # fmt: skip
        if STEP_CASE in chosen_cases:
            rows += step_case(
                device, [p for p in providers if not (quick and p == "compile")],
                repeats=repeats, warmup=warmup, quick=quick, log=log, failures=failures,
            )  # fmt: skip
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.case_main(__doc__, run, _worker_main, argv)


if __name__ == "__main__":
    sys.exit(main())
