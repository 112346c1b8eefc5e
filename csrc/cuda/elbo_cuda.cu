#include "klanneal/elbo.h"
#include "klanneal/elbo_math.h"
