// _C test hooks of the special functions and count likelihoods
// (special_cpu.h): numpy arrays in and out, at a named SIMD level, so that
// tests/test_special_math.py can measure each level's accuracy. Not part of
// the public API.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind.h"
#include "klanneal/special_cpu.h"

namespace py = pybind11;

namespace klanneal {
namespace {

SimdLevel level_from_name(const std::string &name) {
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512})
    if (name == simd_level_name(level))
      return level;
  throw std::invalid_argument("simd_level must be scalar, avx2 or avx512, got '" + name + "'");
}

#define KLANNEAL_NAME_TO_ENUM(Enum, enumerator, text)                                              \
  if (name == text)                                                                                \
    return Enum::enumerator;

cpu::SpecialFn special_fn_from_name(const std::string &name) {
#define KLANNEAL_SPECIAL_CASE(enumerator, text)                                                    \
  KLANNEAL_NAME_TO_ENUM(cpu::SpecialFn, enumerator, text)
  KLANNEAL_SPECIAL_FNS(KLANNEAL_SPECIAL_CASE)
#undef KLANNEAL_SPECIAL_CASE
  throw std::invalid_argument("unknown special function '" + name + "'");
}

cpu::CountFamily count_family_from_name(const std::string &name) {
#define KLANNEAL_FAMILY_CASE(enumerator, text)                                                     \
  KLANNEAL_NAME_TO_ENUM(cpu::CountFamily, enumerator, text)
  KLANNEAL_COUNT_FAMILIES(KLANNEAL_FAMILY_CASE)
#undef KLANNEAL_FAMILY_CASE
  throw std::invalid_argument("unknown count likelihood '" + name + "'");
}
#undef KLANNEAL_NAME_TO_ENUM

// A 1-D C-contiguous array of T with n elements (or null for None).
template <typename T> const T *data_of(const py::object &obj, int64_t n, const char *what) {
  if (obj.is_none())
    return nullptr;
  const auto arr = py::cast<py::array>(obj);
  KLANNEAL_CHECK_ARG(arr.dtype().is(py::dtype::of<T>()) && arr.ndim() == 1 && arr.shape(0) == n &&
                         (arr.flags() & py::array::c_style),
                     std::string(what) + ": expected a contiguous 1-D array of the same dtype "
                                         "and length as x");
  return static_cast<const T *>(arr.data());
}

template <typename T> py::array special_typed(cpu::SpecialFn fn, SimdLevel level, py::array x) {
  const int64_t n = x.shape(0);
  const T *in = data_of<T>(x, n, "x");
  py::array_t<T> out(n);
  T *o = out.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::special_math_eval<T>(fn, level, in, o, n);
  }
  return out;
}

template <typename T>
py::tuple count_typed(cpu::CountFamily family, SimdLevel level, py::array x, py::object mu,
                      py::object theta, py::object zi) {
  const int64_t n = x.shape(0);
  const T *xp = data_of<T>(x, n, "x");
  const T *mp = data_of<T>(mu, n, "mu");
  const T *tp = data_of<T>(theta, n, "theta");
  const T *zp = data_of<T>(zi, n, "zi_logits");
  KLANNEAL_CHECK_ARG(mp != nullptr && (family == cpu::CountFamily::kPoisson || tp != nullptr) &&
                         (family != cpu::CountFamily::kZinb || zp != nullptr),
                     "count_nll_cpu: this family needs mu, theta (nb, zinb) and zi_logits (zinb)");
  py::array_t<T> nll(n), d_mu(n), d_theta(n), d_zi(n);
  T *a = nll.mutable_data(), *b = d_mu.mutable_data(), *c = d_theta.mutable_data(),
    *d = d_zi.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::count_nll_eval<T>(family, level, xp, mp, tp, zp, a, b, c, d, n);
  }
  return py::make_tuple(nll, d_mu, d_theta, d_zi);
}

bool is_float64(const py::array &x) {
  KLANNEAL_CHECK_ARG(x.ndim() == 1 && (x.dtype().is(py::dtype::of<float>()) ||
                                       x.dtype().is(py::dtype::of<double>())),
                     "x: expected a 1-D float32 or float64 array");
  return x.dtype().is(py::dtype::of<double>());
}

} // namespace

void register_special(py::module_ &m) {
  m.def(
      "special_math_cpu",
      [](const std::string &fn, py::array x, const std::string &simd_level) {
        const cpu::SpecialFn f = special_fn_from_name(fn);
        const SimdLevel level = level_from_name(simd_level);
        return is_float64(x) ? special_typed<double>(f, level, x)
                             : special_typed<float>(f, level, x);
      },
      py::arg("fn"), py::arg("x"), py::arg("simd_level"),
      "Test hook: fn (lgamma, digamma, stirling_delta, log, log1p, expm1, log1pmx, softplus, "
      "log_sigmoid, sigmoid) of a 1-D float32/float64 array, computed in its dtype at "
      "simd_level (scalar, avx2, avx512; ValueError above what the CPU allows).");
  m.def(
      "count_nll_cpu",
      [](const std::string &family, py::array x, py::object mu, py::object theta, py::object zi,
         const std::string &simd_level) {
        const cpu::CountFamily f = count_family_from_name(family);
        const SimdLevel level = level_from_name(simd_level);
        return is_float64(x) ? count_typed<double>(f, level, x, mu, theta, zi)
                             : count_typed<float>(f, level, x, mu, theta, zi);
      },
      py::arg("family"), py::arg("x"), py::arg("mu"), py::arg("theta"), py::arg("zi_logits"),
      py::arg("simd_level"),
      "Test hook: (nll, d_mu, d_theta, d_zi_logits) per element of a count likelihood "
      "(poisson, nb, zinb) at simd_level; arrays 1-D of one dtype, theta / zi_logits None "
      "where the family has none.");
}

} // namespace klanneal
