// The elementwise likelihoods' traits structs (elementwise_likelihoods_body.h)
// in namespace klanneal, for the CPU scalar loop and the CUDA kernel, and
// the one runtime dispatch from a Likelihood code to them.
#pragma once

#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "klanneal/common.h"
#include "klanneal/elbo.h"
#include "klanneal/elbo_math.h"

namespace klanneal {

#include "klanneal/elementwise_likelihoods_body.h"

// Calls f(std::integral_constant<Likelihood, L>{}) for the elementwise
// likelihood L == likelihood (host code), and returns what it returns;
// throws std::invalid_argument for kCategorical.
template <typename F> decltype(auto) with_elementwise_likelihood(Likelihood likelihood, F &&f) {
  switch (likelihood) {
#define KLANNEAL_ELEMENTWISE_CASE(enumerator, name, Loss)                                          \
  case Likelihood::enumerator:                                                                     \
    return f(std::integral_constant<Likelihood, Likelihood::enumerator>{});
    KLANNEAL_ELEMENTWISE_LIKELIHOODS(KLANNEAL_ELEMENTWISE_CASE)
#undef KLANNEAL_ELEMENTWISE_CASE
  default:
    break;
  }
  throw std::invalid_argument("elbo: not an elementwise likelihood");
}

// Whether an elementwise likelihood's targets are checked (kChecksTargets).
inline bool checks_targets(Likelihood likelihood) {
  return with_elementwise_likelihood(likelihood, [](auto l) {
    return ElementwiseLoss<decltype(l)::value, float>::kChecksTargets;
  });
}

} // namespace klanneal
