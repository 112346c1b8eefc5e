// Per-element count likelihoods (Poisson, NB, ZINB; scvi-tools'
// parameterisation) as KLANNEAL_HD traits structs, for the scalar CPU path
// and CUDA. The formulas, their derivations and accuracy are in
// count_likelihoods_body.h, written once against an ops traits: here it is
// ScalarOps<T>; a SIMD body instantiates the same structs with
// simd::Vec<Isa, T> (see csrc/special_simd_cpu.cpp).
//
//   PoissonNll<T>::nll_grad(x, mu)                     -> {nll, d_mu}
//   NegBinomialNll<T>::nll_grad(x, mu, theta)          -> {nll, d_mu, d_theta}
//   ZinbNll<T>::nll_grad(x, mu, theta, zi_logits)      -> {nll, d_mu, d_theta, d_zi_logits}
//   ...::nll(...)                                      -> nll only
//   ...::nll_grad_zero(mu[, theta[, zi_logits]])       -> nll_grad at x = 0, bit for bit
//   ...::valid_target(x)                               -> x finite and >= 0
//   count_nll::FamilyNll<F, O>::nll_grad(x, mu, theta, zi_logits): the same
//                                  for family F (CountFamily), one interface
//
// T = float (fp32/fp16/bf16 inputs, converted by the caller) or double.
#pragma once

#include "klanneal/count_family.h"
#include "klanneal/special_math.h"

namespace klanneal {

#include "klanneal/count_likelihoods_body.h"

template <typename T> using PoissonNll = count_nll::Poisson<ScalarOps<T>>;
template <typename T> using NegBinomialNll = count_nll::NegBinomial<ScalarOps<T>>;
template <typename T> using ZinbNll = count_nll::ZeroInflatedNegBinomial<ScalarOps<T>>;

} // namespace klanneal
