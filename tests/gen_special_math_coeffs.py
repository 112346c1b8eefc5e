"""Regenerates the polynomial coefficients of the special functions.

Not a test: run by hand (python tests/gen_special_math_coeffs.py; needs mpmath). Each
polynomial is a Chebyshev fit (mpmath.chebyfit, near-minimax) at 60 digits, printed lowest
degree first, rounded to double and to float, with its max relative error after rounding.
Where they are used: lgamma_core, digamma_core, log1pmx_tail and expm1_tail in
csrc/include/klanneal/special_math_body.h (log1pmx_tail's double set also in
python/klanneal/_count_ref.py), log_tail in csrc/include/klanneal/simd_exp_cpu.h.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 60
DIGAMMA_ROOT = mp.findroot(mp.digamma, mp.mpf("1.46"))  # 1.4616321449683623...
R = DIGAMMA_ROOT - 1


def lgamma_core(t):  # lgamma(1 + a) / (a (a - 1)), a = t + 1/2 in [0, 1]
    a = t + mp.mpf(1) / 2
    if a == 0:
        return +mp.euler
    if a == 1:
        return 1 - mp.euler
    return mp.loggamma(1 + a) / (a * (a - 1))


def digamma_core(t):  # digamma(1 + a) / (a - r), r = root - 1
    a = t + mp.mpf(1) / 2
    if abs(a - R) < mp.mpf(10) ** -40:
        return mp.psi(1, DIGAMMA_ROOT)
    return mp.digamma(1 + a) / (a - R)


def atanh_tail(w):  # (atanh(s) - s) / s^3, w = s^2
    if w == 0:
        return mp.mpf(1) / 3
    s = mp.sqrt(w)
    return (mp.atanh(s) - s) / s**3


def expm1_tail(v):  # (expm1(v) - v) / v^2
    if v == 0:
        return mp.mpf(1) / 2
    return (mp.expm1(v) - v) / v**2


FITS = {
    # name: (function, interval, coefficients for double, for float)
    "lgamma_core": (lgamma_core, [-0.5, 0.5], 21, 11),
    "digamma_core": (digamma_core, [-0.5, 0.5], 22, 12),
    "log1pmx_tail": (atanh_tail, [0, mp.mpf(1) / 9], 10, 5),
    "log_tail": (atanh_tail, [0, mp.mpf("0.0295")], 7, 4),
    "expm1_tail": (expm1_tail, [-0.35, 0.35], 11, 6),
}


def dense_error(f, iv, poly):
    lo, hi = iv
    worst = mp.mpf(0)
    for k in range(401):
        t = lo + (hi - lo) * mp.mpf(k) / 400
        ref = f(t)
        worst = max(worst, abs((mp.polyval(poly, t) - ref) / ref))
    return worst


def main() -> None:
    print("digamma root - 1:", mp.nstr(R, 36))
    hi = float(R)
    hi_f = np.float32(hi)
    print(f"  split for double: {hi!r} + {float(R - mp.mpf(hi))!r}")
    print(
        f"  split for float: {np.format_float_scientific(hi_f, unique=True)}f + "
        f"{float(R - mp.mpf(float(hi_f)))!r}"
    )
    for name, (f, iv, n_double, n_float) in FITS.items():
        for kind, n in (("double", n_double), ("float", n_float)):
            poly = mp.chebyfit(f, iv, n)
            if kind == "double":
                coeffs = [repr(float(c)) for c in reversed(poly)]
                rounded = [mp.mpf(float(c)) for c in poly]
            else:
                coeffs = [
                    np.format_float_scientific(np.float32(float(c)), unique=True) + "f"
                    for c in reversed(poly)
                ]
                rounded = [mp.mpf(float(np.float32(float(c)))) for c in poly]
            err = dense_error(f, iv, rounded)
            print(f"{name} {kind} ({n} coefficients, max relative error {mp.nstr(err, 3)}):")
            print("  " + ", ".join(coeffs))


if __name__ == "__main__":
    main()
