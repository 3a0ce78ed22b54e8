// The kernel primitives compiled for the avx512 CPU capability.
#include "../../moments.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define NORMOPS_CAP cap_avx512
#define NORMOPS_VEC_BYTES 64
#include "kernels_impl.h"
