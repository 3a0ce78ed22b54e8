// The kernel primitives compiled for the avx2 CPU capability.
#include "../../moments.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
#endif
#define NORMOPS_CAP cap_avx2
#define NORMOPS_VEC_BYTES 32
#include "kernels_impl.h"
