// CPU emulation of the slice of the CUDA runtime that csrc/cuda/ uses, for
// tests/test_elbo_cuda_emulated.py: every CUDA thread of a block is a
// std::thread, blocks run one after another (so a function-local `static`
// is block-shared memory), __syncthreads/__syncwarp are barriers. It checks
// the kernels' index arithmetic, reductions and barrier placement on a
// machine without a GPU; it says nothing about device performance.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace emu {

// A reusable barrier that gives up (throws) instead of hanging when the
// threads of a block do not all reach it: a kernel with a divergent barrier
// fails the test instead of deadlocking it.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (broken_) throw std::runtime_error("emulated barrier broken");
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(20),
                      [&] { return generation_ != generation || broken_; }) ||
        broken_) {
      broken_ = true;
      cv_.notify_all();
      throw std::runtime_error("emulated barrier: not every thread arrived (divergent barrier?)");
    }
  }
  void arrive_and_drop() {  // a thread that has finished the kernel
    std::unique_lock<std::mutex> lock(mutex_);
    if (--count_ == arrived_ && arrived_ > 0) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

struct BlockState {
  std::unique_ptr<Barrier> block;
  std::vector<std::unique_ptr<Barrier>> warps;
};

inline thread_local dim3 thread_idx;
inline thread_local BlockState* block_state = nullptr;
inline dim3 block_idx, grid_dim, block_dim;
// The emulated launcher runs at most this many blocks, so that the kernels'
// grid-stride loops are exercised.
inline unsigned int max_blocks = 3;

struct Config {
  dim3 grid, block;
  Config(unsigned int g, unsigned int b, size_t, void*) {
    grid.x = g;
    block.x = b;
  }
};

template <typename... Args>
auto launch_with(Config cfg, void (*kernel)(Args...)) {
  return [cfg, kernel](auto&&... args) {
    const unsigned int blocks = cfg.grid.x < max_blocks ? cfg.grid.x : max_blocks;
    grid_dim = dim3{blocks, 1, 1};
    block_dim = cfg.block;
    const int n = static_cast<int>(cfg.block.x);
    for (unsigned int b = 0; b < blocks; ++b) {
      block_idx = dim3{b, 1, 1};
      BlockState state;
      state.block = std::make_unique<Barrier>(n);
      for (int w = 0; w < (n + 31) / 32; ++w) {
        state.warps.push_back(std::make_unique<Barrier>(n - 32 * w < 32 ? n - 32 * w : 32));
      }
      std::exception_ptr error;
      std::mutex error_mutex;
      std::vector<std::thread> threads;
      for (int t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
          thread_idx = dim3{static_cast<unsigned int>(t), 1, 1};
          block_state = &state;
          try {
            kernel(args...);
          } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
          }
          state.warps[t / 32]->arrive_and_drop();
          state.block->arrive_and_drop();
        });
      }
      for (auto& th : threads) th.join();
      if (error) std::rethrow_exception(error);
    }
  };
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::block_state->block->arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) {
  emu::block_state->warps[threadIdx.x / 32]->arrive_and_wait();
}

// ---- runtime API -------------------------------------------------------------
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
// Host memory stands in for device memory here.
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void*) {
  a->type = cudaMemoryTypeDevice;
  a->device = 0;
  return cudaSuccess;
}
