"""The count reconstruction kernel (_C.count_recon_forward_cpu, csrc/count_cpu.cpp)
against python/klanneal/_count_ref.py in float64: values and gradients, every
family, parameter broadcast, dtype and SIMD level; determinism over thread
counts; the numerical extremes; input validation; argument errors.

Tolerances (the kernel against the float64 reference evaluated at the inputs
as the kernel stores them, so input rounding is not counted):
  float64: row_nll rtol 1e-12, gradients rtol 1e-10 (+ atol 1e-12 x their scale);
  float32, float16, bfloat16 (computed in float32): row_nll rtol 2e-6, gradients
  rtol 2e-5 (+ atol 1e-6 x their scale); half types store their gradients in float32.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from count_cases import (
    FAMILIES,
    LAYOUT,
    has_theta,
    has_zi,
    make_inputs,
    packed_call,
    reference,
    rounded,
    run_cpu,
    set_slot,
)

from klanneal import _C

LEVELS = ("scalar", "avx2", "avx512")
AVAILABLE = LEVELS[: LEVELS.index(_C.build_info()["simd"]) + 1]
TOL = {
    torch.float64: (1e-12, 1e-10, 1e-12),  # row_nll rtol, gradient rtol, gradient atol / scale
    torch.float32: (2e-6, 2e-5, 1e-6),
    torch.float16: (2e-6, 2e-5, 1e-6),
    torch.bfloat16: (2e-6, 2e-5, 1e-6),
}
GRADS = ("grad_mu", "grad_theta", "grad_zi")


def assert_matches(got: dict, want: dict, dtype: torch.dtype, what: object = "") -> None:
    value_rtol, grad_rtol, grad_atol = TOL[dtype]
    torch.testing.assert_close(got["row_nll"], want["row_nll"], rtol=value_rtol, atol=0,
                               msg=lambda m: f"row_nll {what}: {m}")  # fmt: skip
    for name in GRADS:
        if name not in got:
            continue
        scale = want[name].abs().max().item() if want[name].numel() else 0.0
        torch.testing.assert_close(
            got[name].double(), want[name], rtol=grad_rtol, atol=grad_atol * scale,
            msg=lambda m, name=name: f"{name} {what}: {m}",
        )  # fmt: skip


def case_matrix():
    for family in FAMILIES:
        thetas = ("scalar", "gene", "example", "element") if has_theta(family) else ("-",)
        for theta_shape in thetas:
            for zi_shape in ("gene", "element") if has_zi(family) else ("-",):
                yield family, theta_shape, zi_shape


@pytest.mark.parametrize("level", AVAILABLE)
@pytest.mark.parametrize("family,theta_shape,zi_shape", list(case_matrix()))
def test_values_and_gradients_match_the_reference(family, theta_shape, zi_shape, level):
    # G = 300: a full and a partial gene block, chunks and a tail of every width;
    # B = 70: two row chunks, the second partial.
    master = make_inputs(family, 70, 300, theta_shape, zi_shape, seed=3)
    row_scale = torch.linspace(0.5, 2.0, 70, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        inputs = rounded(master, dtype)
        kwargs = dict(row_scale=row_scale, grad_scale=1.0 / 70)
        got = run_cpu(family, inputs, simd_level=LEVELS.index(level), n_threads=2, **kwargs)
        assert_matches(got, reference(family, inputs, **kwargs), dtype, (dtype, level))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_inputs_are_computed_in_float32(family, dtype):
    master = make_inputs(family, 9, 41, "gene", "element", seed=5)
    master["counts"] = master["counts"].clamp(max=200)  # whole in bf16
    inputs = rounded(master, dtype)
    for level in AVAILABLE:
        got = run_cpu(family, inputs, simd_level=LEVELS.index(level), grad_scale=2.5)
        for name in GRADS:
            if name in got:
                assert got[name].dtype == torch.float32
        assert_matches(got, reference(family, inputs, grad_scale=2.5), dtype, level)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_summed_over_the_batch_do_not_depend_on_the_thread_count(family):
    # 4 row chunks x 3 gene blocks = 12 tiles, claimed by the threads in any order.
    inputs = rounded(make_inputs(family, 200, 700, "gene", "scalar", seed=7), torch.float32)
    runs = [run_cpu(family, inputs, n_threads=n) for n in (1, 2, 3, 7)]
    for run in runs[1:]:
        for name, value in runs[0].items():
            assert torch.equal(value, run[name]), name


def test_broadcast_parameters_are_summed_over_their_dimensions():
    # Scalar theta, [B, 1] zi_logits: each gradient is the sum of the
    # per-element gradients of a [B, G] parameter over the broadcast dimensions.
    master = make_inputs("zinb", 6, 50, "scalar", "example", seed=11)
    full = dict(master, theta=master["theta"].expand(6, 50).contiguous(),
                zi_logits=master["zi_logits"].expand(6, 50).contiguous())  # fmt: skip
    got = run_cpu("zinb", master)
    per_element = run_cpu("zinb", full)
    torch.testing.assert_close(got["grad_theta"], per_element["grad_theta"].sum().reshape(()))
    torch.testing.assert_close(got["grad_zi"], per_element["grad_zi"].sum(1, keepdim=True))


@pytest.mark.parametrize("wanted", [(), ("mu",), ("theta",), ("zi_logits",)])
def test_gradients_not_asked_for_are_not_written(wanted):
    inputs = make_inputs("zinb", 5, 33, "gene", "gene", seed=2)
    got = run_cpu("zinb", inputs, grads=wanted)
    want = reference("zinb", inputs)
    assert set(got) == {"row_nll"} | {f"grad_{w.split('_')[0]}" for w in wanted}
    assert_matches(got, want, torch.float64)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0), (1, 1)])
def test_empty_and_single_element_batches(shape):
    inputs = make_inputs("zinb", *shape, "scalar", "gene", seed=1)
    got = run_cpu("zinb", inputs, validate=True)
    assert_matches(got, reference("zinb", inputs), torch.float64)
    assert got["first_invalid"].tolist() == [-1, -1]


# ---- numerical extremes --------------------------------------------------------------
def extreme_inputs(n: int = 4000, seed: int = 0) -> dict[str, torch.Tensor]:
    """theta log-uniform in [1e-6, 1e8] (up to the Poisson limit), mu in [1e-10, 1e8],
    counts up to 1e6 (a third 0, a third near mu, a third log-uniform), zi_logits
    in [-80, 80]; one example row of n genes."""
    gen = torch.Generator().manual_seed(seed)

    def log_uniform(lo, hi):
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    mu = log_uniform(1e-10, 1e8)
    counts = torch.poisson(mu.clamp(max=1e6), generator=gen)
    third = torch.arange(n) % 3
    counts[third == 0] = 0.0
    counts[third == 2] = torch.floor(log_uniform(1.0, 1e6))[third == 2]
    zi = 160.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 80.0
    zi[:4] = torch.tensor([80.0, -80.0, 80.0, -80.0])
    return {"mu": mu[None], "counts": counts[None], "theta": log_uniform(1e-6, 1e8),
            "zi_logits": zi}  # fmt: skip


@pytest.mark.parametrize("level", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_values_keep_their_digits(family, dtype, level):
    master = extreme_inputs(seed=FAMILIES.index(family))
    master = {k: v for k, v in master.items() if k in ("mu", "counts")
              or (k == "theta" and has_theta(family))
              or (k == "zi_logits" and has_zi(family))}  # fmt: skip
    inputs = rounded(master, dtype)
    got = run_cpu(family, inputs, simd_level=LEVELS.index(level), validate=True)
    assert got["first_invalid"].tolist() == [-1, -1]
    want = reference(family, inputs)
    # And per element (a row per gene).
    rows = {k: v.reshape(-1, 1) for k, v in inputs.items() if k in ("mu", "counts")}
    for k in ("theta", "zi_logits"):
        if k in inputs:
            rows[k] = inputs[k].reshape(-1, 1)
    got_rows = run_cpu(family, rows, simd_level=LEVELS.index(level))
    want_rows = reference(family, rows)
    # The float64 reference itself is off by up to 16 eps (ZINB zeros at zi_logits
    # ~ 33, against mpmath), the kernel by < 1 there.
    # A loss below the smallest normal number (a ZINB zero at zi_logits ~ 80 in
    # fp32: 5e-45) keeps only its subnormal digits.
    eps = torch.finfo(dtype).eps * (32 if dtype == torch.float64 else 16)
    tiny = 16 * torch.finfo(dtype).tiny
    err = (got_rows["row_nll"] - want_rows["row_nll"]).abs()
    assert (err <= eps * want_rows["row_nll"].abs() + tiny).all(), err.max()
    assert torch.isfinite(got["row_nll"]).all()
    for name in GRADS:
        if name in got:
            assert torch.isfinite(got[name]).all(), name
    torch.testing.assert_close(got["row_nll"], want["row_nll"], rtol=eps, atol=0)
    # A ZINB zero's d/dmu = q sigmoid(nb0 - z), nb0 = log NB(0): exp of a gap
    # |nb0 - z| up to ~700 turns the gap's rounding into up to ~700 eps (in the
    # reference as in the kernel; against mpmath the kernel's stays below that).
    grad_rtol = eps * (64 if family == "zinb" else 1)
    torch.testing.assert_close(got_rows["grad_mu"].double(), want_rows["grad_mu"],
                               rtol=grad_rtol, atol=tiny)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_vanishing_mean_at_a_zero_count_costs_nothing(family, dtype):
    tiny = 1e-300 if dtype == torch.float64 else 1e-37
    inputs = {"mu": torch.full((2, 40), tiny, dtype=torch.float64),
              "counts": torch.zeros(2, 40, dtype=torch.float64)}  # fmt: skip
    inputs["counts"][1, ::2] = 5.0  # x > 0 at a tiny mean: a large, finite loss
    if has_theta(family):
        inputs["theta"] = torch.logspace(-6, 8, 40, dtype=torch.float64)
    if has_zi(family):
        inputs["zi_logits"] = torch.linspace(-80, 80, 40, dtype=torch.float64)
    inputs = rounded(inputs, dtype)
    for level in AVAILABLE:
        got = run_cpu(family, inputs, simd_level=LEVELS.index(level))
        for name in GRADS:
            if name in got:
                assert torch.isfinite(got[name]).all(), (name, level)
        assert abs(got["row_nll"][0].item()) <= 1.1 * 40 * tiny, level  # loss ~ mu at x = 0
        want = reference(family, inputs)
        assert math.isfinite(got["row_nll"][1].item()) and got["row_nll"][1].item() > 1e3
        torch.testing.assert_close(got["row_nll"], want["row_nll"], rtol=1e-5, atol=1e-30)


# ---- the zero-count path ----------------------------------------------------------------
def sparse_extreme_inputs(family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """4 examples x 300 genes (a full and a partial gene block) with 95%, 50%, 0% and
    100% zero counts (some of them -0.0), extreme means and parameters per element."""
    batch, genes = 4, 300
    gen = torch.Generator().manual_seed(23)

    def log_uniform(lo, hi):
        u = torch.rand(batch, genes, generator=gen, dtype=torch.float64)
        return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    mu = log_uniform(1e-10, 1e8)
    counts = torch.maximum(torch.poisson(mu.clamp(max=1e6), generator=gen), torch.ones(()))
    big = torch.rand(batch, genes, generator=gen) < 0.3
    counts[big] = torch.floor(log_uniform(1.0, 1e6))[big]
    zero_fraction = torch.tensor([[0.95], [0.5], [0.0], [1.0]], dtype=torch.float64)
    zero = torch.rand(batch, genes, generator=gen, dtype=torch.float64) < zero_fraction
    counts[zero] = 0.0
    counts[zero & (torch.rand(batch, genes, generator=gen) < 0.2)] = -0.0
    inputs = {"mu": mu, "counts": counts}
    if has_theta(family):
        inputs["theta"] = log_uniform(1e-6, 1e8)
    if has_zi(family):
        inputs["zi_logits"] = 160.0 * torch.rand(batch, genes, generator=gen) - 80.0
    return rounded(inputs, dtype)


def tile_order_sum(values: list[float]) -> float:
    """One example's per-gene losses summed in the CPU tile's order (count_simd_body.h:
    per gene block, slot j += genes j, j + 16, ...; the slots pairwise; the blocks in order)."""
    total = 0.0
    for g0 in range(0, len(values), 256):
        slots = [0.0] * 16
        for i, value in enumerate(values[g0 : g0 + 256]):
            slots[i % 16] += value
        while len(slots) > 1:
            slots = [slots[2 * j] + slots[2 * j + 1] for j in range(len(slots) // 2)]
        total += slots[0]
    return total


@pytest.mark.parametrize("level", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_counts_get_the_bits_of_the_full_formula(family, dtype, level):
    # The tile evaluates zero counts with nll_grad_zero and the others, packed, with
    # nll_grad; every element must be what nll_grad gives it alone (_C.count_nll_cpu, the
    # full formula per element at the same level), bit for bit, at its own position.
    inputs = sparse_extreme_inputs(family, dtype)
    got = run_cpu(family, inputs, simd_level=LEVELS.index(level))  # grad_scale 1: exact copies
    flat = {k: v.reshape(-1).numpy() for k, v in inputs.items()}
    nll, d_mu, d_theta, d_zi = (
        torch.from_numpy(out).reshape(inputs["mu"].shape)
        for out in _C.count_nll_cpu(family, flat["counts"], flat["mu"], flat.get("theta"),
                                    flat.get("zi_logits"), level)
    )  # fmt: skip

    def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        ints = torch.int64 if want.element_size() == 8 else torch.int32
        assert torch.equal(got.view(ints), want.view(ints)), what  # -0.0 is not 0.0 here

    assert_same_bits(got["grad_mu"], d_mu, "grad_mu")
    if has_theta(family):
        assert_same_bits(got["grad_theta"], d_theta, "grad_theta")
    if has_zi(family):
        assert_same_bits(got["grad_zi"], d_zi, "grad_zi")
    rows = [tile_order_sum(row.double().tolist()) for row in nll]
    assert_same_bits(got["row_nll"], torch.tensor(rows, dtype=torch.float64), "row_nll")


# ---- validation -----------------------------------------------------------------------
BAD = [
    ("mu", 0.0), ("mu", -1.0), ("mu", math.inf), ("mu", math.nan),
    ("counts", -1.0), ("counts", 1.5), ("counts", math.inf), ("counts", math.nan),
    ("theta", 0.0), ("theta", -2.0), ("theta", math.inf), ("theta", math.nan),
    ("zi_logits", math.nan),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,value", BAD)
def test_validation_reports_the_first_invalid_element(name, value, dtype):
    inputs = make_inputs("zinb", 70, 300, "gene", "element", seed=4)
    inputs["counts"] = inputs["counts"].clamp(max=100)
    which = LAYOUT["input"].index(name)
    if name == "theta":  # per gene: first met at example 0
        inputs[name][257] = value
        want = [257, which]
    else:
        inputs[name][66, 290] = value
        inputs[name][69, 3] = value  # later in row-major order
        want = [66 * 300 + 290, which]
    inputs = rounded(inputs, dtype)
    for n_threads in (1, 3):
        got = run_cpu("zinb", inputs, validate=True, n_threads=n_threads)
        assert got["first_invalid"].tolist() == want


def test_an_earlier_input_of_the_same_element_is_named_first():
    inputs = make_inputs("nb", 3, 10, "element", seed=4)
    inputs["counts"][1, 4] = -1.0
    inputs["theta"][1, 4] = 0.0
    inputs["mu"][2, 0] = 0.0
    got = run_cpu("nb", inputs, validate=True)
    assert got["first_invalid"].tolist() == [14, LAYOUT["input"].index("counts")]


# ---- argument errors --------------------------------------------------------------------
def _call(family_name="nb", **changes):
    inputs = make_inputs(family_name, 3, 5, "gene", "gene")
    sizes, ptrs, floats, out = packed_call(family_name, inputs)
    for slot, value in changes.items():
        kind = next(k for k in ("sizes", "ptrs", "floats") if slot in LAYOUT[k])
        if kind == "sizes":
            sizes = set_slot(sizes, kind, slot, value)
        else:
            ptrs = set_slot(ptrs, kind, slot, value)
    return inputs, out, lambda: _C.count_recon_forward_cpu(sizes, ptrs, floats)


@pytest.mark.parametrize(
    "family,changes,message",
    [
        ("nb", dict(family=len(FAMILIES)), "family code"),
        ("nb", dict(family=-5), "enum code is out of range"),
        ("nb", dict(dtype=9), "dtype"),
        ("nb", dict(theta=0), "needs theta"),
        ("nb", dict(theta_row_stride=7, theta_col_stride=1), "strides"),
        ("nb", dict(theta_row_stride=1, theta_col_stride=3), "strides"),
        ("nb", dict(mu=0), "required"),
        ("nb", dict(row_nll=0), "required"),
        ("nb", dict(batch=-1), "batch and genes"),
        ("nb", dict(simd_level=7), "simd_level"),
        ("poisson", dict(theta=1), "poisson has no theta"),
        ("nb", dict(zi_logits=8), "only zinb"),
        ("zinb", dict(zi_logits=0), "zinb needs zi_logits"),
    ],
)  # fmt: skip
def test_bad_parameters_raise_value_error(family, changes, message):
    _, _, call = _call(family, **changes)  # (never one that runs: out-of-bounds pointers)
    with pytest.raises(ValueError, match=message):
        call()


def test_packed_lists_of_the_wrong_length_raise():
    with pytest.raises(ValueError, match="wrong length"):
        _C.count_recon_forward_cpu([1, 2], [0], [1.0])


def test_layout_names_every_slot_once():
    for kind in ("sizes", "ptrs", "floats"):
        assert len(set(LAYOUT[kind])) == len(LAYOUT[kind])
    assert LAYOUT["family"] == ["poisson", "nb", "zinb"]
    assert LAYOUT["input"] == ["mu", "counts", "theta", "zi_logits"]


_CAP_SCRIPT = """
import pytest, torch
from klanneal import _C
from count_cases import make_inputs, run_cpu, reference
assert _C.build_info()["simd"] == "scalar"
inputs = make_inputs("zinb", 3, 20)
got = run_cpu("zinb", inputs)  # simd_level -1: the capped level
torch.testing.assert_close(got["row_nll"], reference("zinb", inputs)["row_nll"], rtol=1e-12, atol=0)
with pytest.raises(ValueError, match="above what this build"):
    run_cpu("zinb", inputs, simd_level=1)
print("ok")
"""


def test_klanneal_simd_caps_the_level():
    # The dispatch level is fixed per process: the capped level runs in a child.
    proc = subprocess.run(
        [sys.executable, "-c", _CAP_SCRIPT], cwd=os.path.dirname(__file__),
        env=dict(os.environ, KLANNEAL_SIMD="scalar"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
