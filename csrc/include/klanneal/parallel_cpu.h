// The CPU kernels' threads: one persistent worker pool shared by the ELBO
// launcher and the schedule fills, and parallel_for over it.
//
// parallel_for(n_units, n_threads, fn) calls fn(begin, end) on disjoint
// ranges covering [0, n_units). Ranges are claimed dynamically, `grain`
// units at a time, by the calling thread and by up to n_threads - 1 workers
// of a persistent pool: a worker the OS has not scheduled yet leaves its
// share to the others instead of holding up the call. Which thread runs a
// unit never changes a result: every unit writes only its own output slots.
//
// When the process has GNU OpenMP loaded (torch's Linux wheels bundle
// libgomp for their intra-op threads), the ranges are claimed by the members
// of an OpenMP team instead: the same threads torch's own ops use, which
// would otherwise spin on the cores the pool needs (parallel_cpu.cpp).
//
// The pool is created on first use and grows to the largest thread count
// asked for. One call uses it at a time; a concurrent call (another Python
// thread) starts threads of its own instead of waiting. The pool is never
// destroyed: its workers are detached and sleep on a condition variable, so
// nothing is joined or torn down at interpreter exit. A fork()ed child gets
// a fresh pool on first use (the parent's workers do not exist there).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace klanneal {
namespace cpu {

// Hardware threads (at least 1): the pool never grows beyond them.
int max_threads();

// Runs job(context) on the calling thread and on up to n_helpers workers
// (OpenMP team members or pool workers); returns when every thread that
// started on it has finished (an exception is rethrown after that). False,
// with nothing run, if the pool is busy with another call or cannot start
// its threads.
bool run_on_pool(int n_helpers, void (*job)(void *), void *context);

// Whether parallel_for runs on the process's GNU OpenMP team (torch's
// intra-op threads) rather than on klanneal's own pool (parallel_cpu.cpp).
bool uses_openmp_team();

// Claims ranges of `grain` units from `next` until none are left.
template <typename F>
void claim_units(std::atomic<int64_t> &next, int64_t n_units, int64_t grain, const F &fn) {
  for (;;) {
    const int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
    if (begin >= n_units)
      return;
    fn(begin, std::min(begin + grain, n_units));
  }
}

template <typename F> void parallel_for(int64_t n_units, int n_threads, const F &fn) {
  n_threads = std::min(n_threads, max_threads());
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_units)));
  if (n_threads == 1) {
    fn(0, n_units);
    return;
  }
  // About 8 claims per thread: small enough to balance a late or slow
  // thread, large enough that the atomic is never contended.
  const int64_t grain = std::max<int64_t>(1, n_units / (8 * static_cast<int64_t>(n_threads)));
  std::atomic<int64_t> next{0};
  struct Job {
    std::atomic<int64_t> *next;
    int64_t n_units, grain;
    const F *fn;
  } job{&next, n_units, grain, &fn};
  auto run_job = [](void *context) {
    const Job &j = *static_cast<const Job *>(context);
    claim_units(*j.next, j.n_units, j.grain, *j.fn);
  };
  if (run_on_pool(n_threads - 1, run_job, &job))
    return;
  // Pool busy (a concurrent call) or out of threads: threads of our own.
  std::vector<std::thread> workers;
  workers.reserve(n_threads - 1);
  for (int k = 1; k < n_threads; ++k) {
    try {
      workers.emplace_back(run_job, &job);
    } catch (...) {
      break; // the threads that did start, and this one, share the work
    }
  }
  run_job(&job);
  for (auto &w : workers)
    w.join();
}

} // namespace cpu
} // namespace klanneal
