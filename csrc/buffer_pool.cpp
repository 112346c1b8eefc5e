// The caching pool of buffer_pool.h: a mutex, the sizes of the buffers handed
// out, and a short list of freed ones.
#include "klanneal/buffer_pool.h"

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__linux__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace klanneal {
namespace {

// Every buffer takes its size rounded up to whole kPoolAlignment blocks; the
// limits and pool_cached_bytes() count that allocated size.
size_t allocated_size(size_t bytes) {
  return (bytes + kPoolAlignment - 1) / kPoolAlignment * kPoolAlignment;
}

struct Pool {
  std::mutex mutex;
  std::unordered_map<void *, size_t> live;       // handed out: pointer -> requested bytes
  std::vector<std::pair<void *, size_t>> cached; // free (requested bytes), oldest first
  size_t cached_bytes = 0;                       // allocated sizes of `cached`

  // Room for every push in pool_release, so that it never allocates.
  Pool() { cached.reserve(kPoolMaxBuffers + 1); }
};

Pool *g_pool = nullptr;

// Never destroyed: tensors (and so pool_release) may outlive static
// destruction at interpreter exit.
//
// Fork safety: buffers are released without the GIL (by autograd, by
// empty_cache), so another thread may hold the mutex at the moment a thread
// calls fork(); the child, which has only the forking thread, would then
// wait for it forever. The atfork handlers take the mutex around fork() and
// release it in both processes, so the child starts with it free and with a
// consistent pool (the buffers it inherited are valid copies).
Pool &pool() {
  static Pool *p = [] {
    g_pool = new Pool();
#if defined(__linux__) || defined(__APPLE__)
    pthread_atfork([] { g_pool->mutex.lock(); }, [] { g_pool->mutex.unlock(); },
                   [] { g_pool->mutex.unlock(); });
#endif
    return g_pool;
  }();
  return *p;
}

void *allocate_aligned(size_t bytes) {
  // Rounded up to whole huge pages so the advice covers the whole buffer.
  const size_t rounded = allocated_size(bytes);
  if (rounded < bytes)
    throw std::bad_alloc();
  void *ptr = nullptr;
  if (posix_memalign(&ptr, kPoolAlignment, rounded) != 0 || ptr == nullptr)
    throw std::bad_alloc();
  advise_huge_pages(ptr, rounded);
  return ptr;
}

} // namespace

void advise_huge_pages(void *ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t begin = (start + kPoolAlignment - 1) & ~(kPoolAlignment - 1);
  const uintptr_t end = (start + bytes) & ~(kPoolAlignment - 1);
  if (end > begin)
    madvise(reinterpret_cast<void *>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

void *pool_acquire(size_t bytes) {
  if (bytes == 0)
    throw std::bad_alloc();
  Pool &p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    for (auto it = p.cached.begin(); it != p.cached.end(); ++it) {
      if (it->second == bytes) {
        void *ptr = it->first;
        p.cached.erase(it);
        p.cached_bytes -= allocated_size(bytes);
        p.live.emplace(ptr, bytes);
        return ptr;
      }
    }
  }
  // Allocated outside the lock: a large allocation may take a while.
  void *ptr = allocate_aligned(bytes);
  std::lock_guard<std::mutex> lock(p.mutex);
  try {
    p.live.emplace(ptr, bytes);
  } catch (...) {
    std::free(ptr);
    throw;
  }
  return ptr;
}

void pool_release(void *ptr) noexcept {
  if (ptr == nullptr)
    return;
  Pool &p = pool();
  // At most kPoolMaxBuffers + 1 buffers leave: no allocation in here.
  std::array<void *, kPoolMaxBuffers + 2> to_free{};
  size_t n_free = 0;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    const auto it = p.live.find(ptr);
    if (it == p.live.end()) {
      std::fprintf(stderr, "klanneal: pool_release of a pointer the pool did not hand out\n");
      std::abort();
    }
    const size_t bytes = it->second;
    p.live.erase(it);
    if (allocated_size(bytes) <= kPoolMaxBytes) {
      p.cached.emplace_back(ptr, bytes); // within the reserved capacity
      p.cached_bytes += allocated_size(bytes);
    } else {
      to_free[n_free++] = ptr;
    }
    // Over a limit: drop the oldest cached buffers first.
    while (!p.cached.empty() &&
           (p.cached.size() > kPoolMaxBuffers || p.cached_bytes > kPoolMaxBytes)) {
      to_free[n_free++] = p.cached.front().first;
      p.cached_bytes -= allocated_size(p.cached.front().second);
      p.cached.erase(p.cached.begin());
    }
  }
  for (size_t i = 0; i < n_free; ++i)
    std::free(to_free[i]);
}

size_t pool_cached_bytes() {
  Pool &p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.cached_bytes;
}

void pool_hold_lock_for_testing(int milliseconds) {
  Pool &p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  std::this_thread::sleep_for(std::chrono::milliseconds(milliseconds));
}

void pool_empty_cache() {
  Pool &p = pool();
  // Swapped in with the room that pool_release relies on to never allocate.
  std::vector<std::pair<void *, size_t>> to_free;
  to_free.reserve(kPoolMaxBuffers + 1);
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    to_free.swap(p.cached);
    p.cached_bytes = 0;
  }
  for (auto &entry : to_free)
    std::free(entry.first);
}

} // namespace klanneal
