// The kernel primitives compiled for the portable baseline (no ISA beyond
// the compiler default): the fallback for CPUs without AVX2.
#include "../../moments.h"
#include "kernels.h"

#define NORMOPS_CAP cap_default
#define NORMOPS_VEC_BYTES 16
#include "kernels_impl.h"
