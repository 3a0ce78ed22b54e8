// Run-time choice of the CPU kernel build: the best the CPU supports, capped
// by NORMOPS_CPU_CAPABILITY (default, avx2 or avx512) so that every build can
// be tested on one machine.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "kernels/kernels.h"

namespace normops {
namespace cpu {
namespace {

Capability detect() {
  Capability best = Capability::Default;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    best = Capability::AVX2;
  if (best == Capability::AVX2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Capability::AVX512;
#endif
  const char* env = std::getenv("NORMOPS_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  Capability wanted;
  if (std::strcmp(env, "default") == 0) {
    wanted = Capability::Default;
  } else if (std::strcmp(env, "avx2") == 0) {
    wanted = Capability::AVX2;
  } else if (std::strcmp(env, "avx512") == 0) {
    wanted = Capability::AVX512;
  } else {
    TORCH_WARN("NORMOPS_CPU_CAPABILITY='", env,
               "' is not one of default, avx2, avx512; using the best supported build");
    return best;
  }
  return wanted < best ? wanted : best;
}

}  // namespace

Capability cpu_capability() {
  static const Capability cap = detect();
  return cap;
}

const char* cpu_capability_name() {
  switch (cpu_capability()) {
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T>& table = [] () -> const Kernels<T>& {
    switch (cpu_capability()) {
      case Capability::AVX512: return cap_avx512::kernel_table<T>();
      case Capability::AVX2: return cap_avx2::kernel_table<T>();
      default: return cap_default::kernel_table<T>();
    }
  }();
  return table;
}

template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();
template const Kernels<bf16_t>& kernels<bf16_t>();
template const Kernels<half_t>& kernels<half_t>();

}  // namespace cpu
}  // namespace normops
