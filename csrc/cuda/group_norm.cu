// Group and instance norm's CUDA backend: the CUDA channel drivers under the
// shared op logic (csrc/group_norm_impl.h).
#include <torch/library.h>

#include "../group_norm_impl.h"
#include "channel_norm.cuh"

namespace normops {
namespace cuda {
namespace {

struct CudaGroupNorm : ChannelDrivers {
  static constexpr bool kFused = false;
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CUDA, m) { group_norm::register_kernels<CudaGroupNorm>(m); }

}  // namespace cuda
}  // namespace normops
