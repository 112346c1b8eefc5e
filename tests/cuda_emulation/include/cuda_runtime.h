// CPU emulation of the slice of the CUDA runtime that csrc/cuda/ uses, for
// tests/test_elbo_cuda_emulated.py. Each CUDA thread of a block is a fiber
// (ucontext) on the calling OS thread; blocks run one after another, so a
// function-local `static` is the block's shared memory. A fiber runs until
// it reaches __syncthreads()/__syncwarp() or returns; between barriers the
// runnable fibers are resumed in a fresh random order each round, so code
// that reads shared memory written by another thread without a barrier in
// between sees stale data and fails the comparison. A barrier that not every
// live thread of its block (warp) can reach raises instead of hanging. This
// checks index arithmetic, reductions and barrier placement on a machine
// without a GPU; it says nothing about device performance.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <random>
#include <stdexcept>
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

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Wait wait = Wait::kNone;
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = 0;
  const std::function<void()> *body = nullptr;
  std::exception_ptr error;
  std::mt19937 rng{20261123u};
};

inline Scheduler scheduler;
inline dim3 thread_idx, block_idx, grid_dim, block_dim;
// The emulated launcher runs at most this many blocks, so that the kernels'
// grid-stride loops are exercised.
inline unsigned int max_blocks = 3;

inline void yield_at(Wait wait) {
  Fiber &f = scheduler.fibers[scheduler.current];
  f.wait = wait;
  swapcontext(&f.context, &scheduler.main);
}

inline void fiber_entry() {
  try {
    (*scheduler.body)();
  } catch (...) {
    if (!scheduler.error)
      scheduler.error = std::current_exception();
  }
  scheduler.fibers[scheduler.current].wait = Wait::kDone;
  // Returning resumes uc_link (the scheduler).
}

// Releases the barriers whose every live participant is waiting there.
inline bool release_barriers(int n) {
  bool released = false;
  bool block_ready = true;
  for (const Fiber &f : scheduler.fibers) {
    if (f.wait != Wait::kDone && f.wait != Wait::kBlock)
      block_ready = false;
  }
  for (Fiber &f : scheduler.fibers) {
    if (block_ready && f.wait == Wait::kBlock) {
      f.wait = Wait::kNone;
      released = true;
    }
  }
  for (int w = 0; w * 32 < n; ++w) {
    bool warp_ready = true, any = false;
    for (int t = 32 * w; t < n && t < 32 * (w + 1); ++t) {
      const Wait s = scheduler.fibers[t].wait;
      if (s != Wait::kDone && s != Wait::kWarp)
        warp_ready = false;
      any = any || s == Wait::kWarp;
    }
    if (!warp_ready || !any)
      continue;
    for (int t = 32 * w; t < n && t < 32 * (w + 1); ++t) {
      if (scheduler.fibers[t].wait == Wait::kWarp)
        scheduler.fibers[t].wait = Wait::kNone;
    }
    released = true;
  }
  return released;
}

inline void run_block(int n, const std::function<void()> &body) {
  constexpr size_t kStackBytes = 128 * 1024;
  scheduler.fibers.resize(static_cast<size_t>(n));
  scheduler.body = &body;
  scheduler.error = nullptr;
  for (Fiber &f : scheduler.fibers) {
    f.stack.resize(kStackBytes);
    f.wait = Wait::kNone;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &scheduler.main;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::vector<int> order;
  for (;;) {
    order.clear();
    for (int t = 0; t < n; ++t) {
      if (scheduler.fibers[t].wait == Wait::kNone)
        order.push_back(t);
    }
    if (order.empty()) {
      bool all_done = true;
      for (const Fiber &f : scheduler.fibers)
        all_done = all_done && f.wait == Wait::kDone;
      if (all_done)
        break;
      if (!release_barriers(n)) {
        throw std::runtime_error("emulated CUDA: a barrier that not every thread reaches");
      }
      continue;
    }
    std::shuffle(order.begin(), order.end(), scheduler.rng);
    for (int t : order) {
      scheduler.current = t;
      thread_idx = dim3{static_cast<unsigned int>(t), 1, 1};
      swapcontext(&scheduler.main, &scheduler.fibers[t].context);
    }
  }
  if (scheduler.error)
    std::rethrow_exception(scheduler.error);
}

struct Config {
  dim3 grid, block;
  Config(unsigned int g, unsigned int b, size_t, void *) {
    grid.x = g;
    block.x = b;
  }
};

template <typename... Args> auto launch_with(Config cfg, void (*kernel)(Args...)) {
  return [cfg, kernel](auto &&...args) {
    const unsigned int blocks = cfg.grid.x < max_blocks ? cfg.grid.x : max_blocks;
    grid_dim = dim3{blocks, 1, 1};
    block_dim = cfg.block;
    const std::function<void()> body = [&] { kernel(args...); };
    for (unsigned int b = 0; b < blocks; ++b) {
      block_idx = dim3{b, 1, 1};
      run_block(static_cast<int>(cfg.block.x), body);
    }
  };
}

} // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::yield_at(emu::Wait::kBlock); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu::yield_at(emu::Wait::kWarp); }

// ---- runtime API -------------------------------------------------------------
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
struct CUstream_st;
using cudaStream_t = CUstream_st *;
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
inline const char *cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
inline const char *cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetDevice(int *d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
// Host memory stands in for device memory here.
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *) {
  a->type = cudaMemoryTypeDevice;
  a->device = 0;
  return cudaSuccess;
}
