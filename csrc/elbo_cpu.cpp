#include "klanneal/elbo.h"

namespace klanneal {

void launch_elbo_cpu(const ElboParams& p) {
  (void)p;
  throw std::runtime_error("klanneal: the CPU ELBO kernel is not built yet");
}

}  // namespace klanneal
