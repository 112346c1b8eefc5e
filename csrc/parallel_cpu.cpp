// The threads behind parallel_for (parallel_cpu.h): the process's GNU
// OpenMP team when one is loaded (torch's own intra-op threads), else a
// persistent worker pool of our own.
#include <cctype>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "klanneal/cpu_features.h"
#include "klanneal/parallel_cpu.h"

#if defined(__linux__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace klanneal {
namespace cpu {
namespace {

class WorkerPool {
public:
  // Runs job() on the calling thread and on up to n_helpers workers; returns
  // when every thread that started on it has finished. False (nothing ran)
  // if the pool is busy with another call or cannot start its threads.
  bool run(int n_helpers, void (*job)(void *), void *context) {
    std::unique_lock<std::mutex> dispatch(dispatch_mutex_, std::try_to_lock);
    if (!dispatch.owns_lock() || !grow(n_helpers))
      return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      context_ = context;
      seats_ = n_helpers;
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr error;
    try {
      job(context);
    } catch (...) { // the workers still use the caller's stack: wait for them first
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    seats_ = 0; // a worker waking from now on has nothing left to do
    idle_.wait(lock, [this] { return running_ == 0; });
    if (error)
      std::rethrow_exception(error);
    return true;
  }

private:
  bool grow(int n_helpers) {
    try {
      while (static_cast<int>(n_workers_) < n_helpers) {
        std::thread([this] { work(); }).detach();
        ++n_workers_;
      }
    } catch (...) { // std::system_error: no more threads
      return false;
    }
    return true;
  }

  void work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (seats_ == 0)
        continue;
      --seats_;
      ++running_;
      void (*job)(void *) = job_;
      void *context = context_;
      lock.unlock();
      job(context);
      lock.lock();
      if (--running_ == 0)
        idle_.notify_one();
    }
  }

  std::mutex dispatch_mutex_; // held by the one call using the pool
  std::mutex mutex_;          // guards the fields below
  std::condition_variable wake_, idle_;
  uint64_t generation_ = 0; // bumped once per call
  int seats_ = 0;           // workers that may still join the current call
  int running_ = 0;         // workers inside the current call's job
  size_t n_workers_ = 0;
  void (*job_)(void *) = nullptr;
  void *context_ = nullptr;
};

std::atomic<WorkerPool *> g_pool{nullptr};
std::once_flag g_atfork_once;

WorkerPool &worker_pool() {
  std::call_once(g_atfork_once, [] {
#if defined(__linux__) || defined(__APPLE__)
    // The child of a fork has none of the workers: forget the pool there.
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
#endif
  });
  WorkerPool *pool = g_pool.load();
  if (pool == nullptr) {
    auto *fresh = new WorkerPool; // never deleted: see above
    if (g_pool.compare_exchange_strong(pool, fresh))
      pool = fresh;
    else
      delete fresh; // another thread created it first; `pool` holds that one
  }
  return *pool;
}

} // namespace

// More threads than the machine has cores only add switching: the pool is
// capped there, whatever torch.get_num_threads() says (set_num_threads(256)
// on 2 cores would otherwise leave hundreds of idle workers behind).
int max_threads() {
  static const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

namespace {

// GNU OpenMP's entry point for `#pragma omp parallel` (GCC >= 4.9 ABI):
// runs fn(data) on a team of num_threads threads, the caller included, and
// returns when all have finished.
using GompParallel = void (*)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

#if defined(__linux__)
// A switch's value as python/klanneal/_env.py reads it: "", 0, false, no or
// off (any case, surrounding spaces ignored) switch it off.
bool switched_off(const char *value) {
  const std::string v = normalized_env_value(value);
  return v.empty() || v == "0" || v == "false" || v == "no" || v == "off";
}
#endif

// torch's Linux wheels run their intra-op work on a bundled libgomp, whose
// idle threads spin for milliseconds after every parallel torch op. A pool
// of our own then shares the cores with those spinning threads (on 2 cores
// the text case's row kernel took 9-10 ms right after a torch op against
// 6.3 ms with OMP_WAIT_POLICY=PASSIVE); the spinning threads themselves
// pick up a parallel region at once. So when the process already has
// libgomp loaded (found by its soname, never loaded here: the core links no
// OpenMP and no torch), parallel_for runs on that team. KLANNEAL_OPENMP=0
// (or off, false, no), read at the first parallel call, keeps the pool of
// our own.
GompParallel loaded_gomp_parallel() {
#if defined(__linux__)
  static const GompParallel fn = []() -> GompParallel {
    const char *flag = std::getenv("KLANNEAL_OPENMP");
    if (flag != nullptr && switched_off(flag))
      return nullptr;
    void *handle = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (handle == nullptr)
      return nullptr;
    return reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  }();
  return fn;
#else
  return nullptr;
#endif
}

// libgomp's team does not survive fork(): a child that enters a parallel
// region waits for threads that exist only in the parent. Children (marked
// by a fork handler installed when the library loads) use the pool.
std::atomic<bool> g_forked_child{false};
#if defined(__linux__) || defined(__APPLE__)
const bool g_fork_handler_installed =
    pthread_atfork(nullptr, nullptr, [] { g_forked_child.store(true); }) == 0;
#endif

struct OpenMpJob {
  void (*job)(void *);
  void *context;
  std::mutex mutex;
  std::exception_ptr error; // the first exception of any team member
};

// One team member: an exception must not leave an OpenMP region
// (std::terminate); it is kept and rethrown by the caller.
void run_member(void *data) {
  auto &j = *static_cast<OpenMpJob *>(data);
  try {
    j.job(j.context);
  } catch (...) {
    std::lock_guard<std::mutex> lock(j.mutex);
    if (!j.error)
      j.error = std::current_exception();
  }
}

} // namespace

bool run_on_pool(int n_helpers, void (*job)(void *), void *context) {
  const GompParallel gomp_parallel = g_forked_child.load() ? nullptr : loaded_gomp_parallel();
  if (gomp_parallel != nullptr) {
    OpenMpJob j{job, context, {}, nullptr};
    gomp_parallel(run_member, &j, static_cast<unsigned>(n_helpers + 1), 0);
    if (j.error)
      std::rethrow_exception(j.error);
    return true;
  }
  return worker_pool().run(n_helpers, job, context);
}

bool uses_openmp_team() { return !g_forked_child.load() && loaded_gomp_parallel() != nullptr; }

} // namespace cpu
} // namespace klanneal
