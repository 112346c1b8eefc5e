// CPU emulation (see cuda_runtime.h) of cub::WarpReduce: the result is valid
// in lane 0 only; sequential reduction order.
#pragma once

#include <cuda_runtime.h>

namespace cub {

template <typename T>
class WarpReduce {
 public:
  struct TempStorage {
    T values[32];
  };
  explicit WarpReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    storage_.values[lane] = input;
    __syncwarp();
    if (lane != 0) return input;
    T acc = storage_.values[0];
    for (int i = 1; i < 32; ++i) acc = op(acc, storage_.values[i]);
    return acc;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
