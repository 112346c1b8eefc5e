// schedule_value over an array of steps on the GPU. The formula is the one
// in schedule.h, compiled as device code, so a step gives the same beta here
// as in Python (bit for bit for linear ramps; sigmoid/cosine use the device
// exp/cos and may differ in the last bit).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "klanneal/schedule.h"
#include "klanneal/schedules_cpu.h"

namespace klanneal {
namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loop: enough blocks to fill any current GPU, never more than
// the work needs.
constexpr int64_t kMaxBlocks = 4096;

__global__ void schedule_values_kernel(ScheduleParams params,
                                       const int64_t *__restrict__ steps, // [n]
                                       double *__restrict__ out,          // [n]
                                       int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    out[k] = schedule_value(params, steps[k]);
  }
}

void throw_if_cuda_error(cudaError_t err, const char *what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

} // namespace

void launch_schedule_values_cuda(const ScheduleParams &p, const int64_t *steps, double *out,
                                 int64_t n, void *stream) {
  KLANNEAL_CHECK_ARG(n >= 0, "launch_schedule_values_cuda: n must be >= 0");
  if (n == 0)
    return;
  KLANNEAL_CHECK_ARG(steps != nullptr && out != nullptr,
                     "launch_schedule_values_cuda: steps and out must be device pointers");
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (n + kThreadsPerBlock - 1) / kThreadsPerBlock);
  schedule_values_kernel<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0,
                           static_cast<cudaStream_t>(stream)>>>(p, steps, out, n);
  throw_if_cuda_error(cudaGetLastError(), "launch_schedule_values_cuda: kernel launch failed");
}

} // namespace klanneal
