#include "klanneal/schedule.h"
