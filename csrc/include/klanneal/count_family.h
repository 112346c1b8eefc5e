// The count likelihood families, X(enumerator, "python name"), codes 0, 1,
// ... in list order: the codes of CountReconParams::family, exported by
// _C.count_recon_layout() and by the test hook _C.count_nll_cpu's names.
// Their formulas are the traits structs of count_likelihoods_body.h
// (count_nll::FamilyNll<F, O> names the one of family F).
#pragma once

#include <cstdint>

#include "klanneal/common.h"

namespace klanneal {

#define KLANNEAL_COUNT_FAMILIES(X) X(kPoisson, "poisson") X(kNegBinomial, "nb") X(kZinb, "zinb")
enum class CountFamily : int32_t { KLANNEAL_COUNT_FAMILIES(KLANNEAL_ENUM_ENTRY) };

#define KLANNEAL_COUNT_ONE(enumerator, name) +1
constexpr int kNumCountFamilies = 0 KLANNEAL_COUNT_FAMILIES(KLANNEAL_COUNT_ONE);
#undef KLANNEAL_COUNT_ONE

} // namespace klanneal
