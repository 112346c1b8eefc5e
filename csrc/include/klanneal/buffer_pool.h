// A small caching pool for the fused ELBO op's large CPU gradient buffers.
//
// Without it every training step allocates a fresh logits-sized buffer for
// d loss / d logits (tens of MB: glibc maps it, the kernel zeroes each page on
// first touch) and frees it again (munmap) once the decoder's backward has
// used it. The pool keeps up to kPoolMaxBuffers freed buffers, kPoolMaxBytes
// in all, and hands one back to the next request of exactly the same size, as
// PyTorch's CUDA caching allocator does for device memory. Exact sizes only:
// a training loop asks for the same size every step, and a larger buffer
// would hold memory the caller cannot see.
//
// Thread safety: every function takes one mutex and never calls back into
// Python, so pool_release() may run on any thread without the GIL (it is the
// deleter of the tensors built on these buffers).
#pragma once

#include <cstddef>

namespace klanneal {

// Alignment of every pooled buffer (one transparent huge page on x86-64).
constexpr size_t kPoolAlignment = size_t{2} << 20;
// At most this many freed buffers stay cached ...
constexpr size_t kPoolMaxBuffers = 2;
// ... and at most this many (allocated) bytes in all; a freed buffer beyond either limit
// is returned to the system.
constexpr size_t kPoolMaxBytes = size_t{1} << 30;

// A buffer of `bytes` bytes (> 0), kPoolAlignment-aligned: a cached one
// requested with exactly that size if there is one, else a new one of `bytes`
// rounded up to whole kPoolAlignment blocks (with huge-page advice on Linux;
// the pool is meant for buffers of a MiB or more). Throws std::bad_alloc when the system has no
// memory.
void *pool_acquire(size_t bytes);

// Gives back a buffer from pool_acquire: cached if the limits allow, freed
// otherwise. Ignores nullptr; aborts on a pointer the pool did not hand out
// (a double release would otherwise corrupt the cache silently).
void pool_release(void *ptr) noexcept;

// Bytes held in cached (free, not handed out) buffers: their allocated
// sizes, i.e. the requested sizes rounded up to whole kPoolAlignment blocks.
size_t pool_cached_bytes();

// Frees every cached buffer. Buffers handed out are not affected.
void pool_empty_cache();

// Tests only: holds the pool's mutex for `milliseconds` on the calling
// thread, as a release in progress does (tests/test_fork.py forks meanwhile).
void pool_hold_lock_for_testing(int milliseconds);

// Asks Linux for transparent huge pages on the 2 MiB-aligned part of
// [ptr, ptr + bytes): one page fault per 2 MiB on first touch instead of 512.
// Only advice; a no-op elsewhere.
void advise_huge_pages(void *ptr, size_t bytes);

} // namespace klanneal
