// Batch norm's CUDA backend: the CUDA channel drivers under the shared op
// logic (csrc/batch_norm_impl.h).
#include <torch/library.h>

#include "../batch_norm_impl.h"
#include "channel_norm.cuh"

namespace normops {
namespace cuda {
namespace {

struct CudaBatchNorm : ChannelDrivers {
  static constexpr bool kFused = false;
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CUDA, m) { batch_norm::register_kernels<CudaBatchNorm>(m); }

}  // namespace cuda
}  // namespace normops
