// CPU emulation (see cuda_runtime.h) of cub::BlockReduce: same contract as
// CUB (the result is valid in thread 0 only; reusing the temporary storage
// needs a __syncthreads() by the caller), with a sequential reduction order.
#pragma once

#include <cuda_runtime.h>

namespace cub {

template <typename T, int kThreads>
class BlockReduce {
 public:
  struct TempStorage {
    T values[kThreads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    const int tid = static_cast<int>(threadIdx.x);
    storage_.values[tid] = input;
    __syncthreads();
    if (tid != 0) return input;  // as in CUB, only thread 0 gets the aggregate
    T acc = storage_.values[0];
    for (int i = 1; i < kThreads; ++i) acc = op(acc, storage_.values[i]);
    return acc;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
