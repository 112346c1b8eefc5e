"""Fork safety: children forked while other threads use klanneal never hang.

Regression (issue 9): the gradient-buffer pool's mutex had no fork handler,
and buffers are released without the GIL (by autograd's backward, by
empty_cache), so a fork while another thread was inside pool_release handed
the child a locked mutex: 4 of 800 children hung in pool_acquire. Every
child here has a deadline; a hung one is killed and counted.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import klanneal

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.skipif(not klanneal.HAS_NATIVE, reason="needs the native extension"),
]

_SCRIPT = r"""
import os, sys, threading, time
import torch, klanneal
torch.set_num_threads(1)
N_FORKS, DEADLINE = int(sys.argv[1]), float(sys.argv[2])
shape = (4, 8, 8200)  # 1 MiB of float32 logits: the gradient comes from the pool
target = torch.randint(0, shape[-1], shape[:-1])
mu = torch.zeros(shape[0], 4)
stop = threading.Event()

def churn():
    # Acquires and releases pooled buffers without the GIL: backward frees the
    # gradient, empty_cache frees the cached ones.
    x = torch.randn(shape, requires_grad=True)
    while not stop.is_set():
        klanneal.elbo_loss(x, target, mu, mu).loss.backward()
        x.grad = None
        klanneal.empty_cache()

# One call before the threads start: torch's custom-op layer imports
# torch._dynamo lazily on the first call, and a fork while another thread
# holds Python's import lock leaves the child waiting on it forever (a
# Python-level hazard of fork with threads, not klanneal's pool).
klanneal.elbo_loss(torch.randn(shape, requires_grad=True), target, mu, mu).loss.backward()
workers = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
for w in workers:
    w.start()
child_x = torch.randn(shape, requires_grad=True)
hung = failed = 0
for _ in range(N_FORKS):
    pid = os.fork()
    if pid == 0:  # the child: use the pool, then leave without cleanup
        try:
            # The raw pool (pool_acquire / pool_release), then the op. Only
            # tensors made before the fork: torch's own RNG and allocator
            # paths are not what this tests.
            del_me = torch.from_dlpack(klanneal._C.pooled_empty(list(shape), 0))
            del del_me
            klanneal.elbo_loss(child_x, target, mu, mu).loss.backward()
            klanneal.empty_cache()
            os._exit(0)
        except BaseException:
            os._exit(3)
    deadline = time.monotonic() + DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            failed += os.waitstatus_to_exitcode(status) != 0
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            hung += 1
            break
        time.sleep(0.001)
stop.set()
for w in workers:
    w.join()
print(hung, failed)
"""


def test_children_forked_during_backward_never_hang():
    n_forks = int(os.environ.get("KLANNEAL_FORK_STRESS", "300"))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(n_forks), "20"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hung, failed = (int(v) for v in proc.stdout.split())
    assert (hung, failed) == (0, 0), f"{hung} of {n_forks} children hung, {failed} failed"


_HELD_SCRIPT = r"""
import os, sys, threading, time
import klanneal
_C = klanneal._C
hung = 0
for _ in range(int(sys.argv[1])):
    # Another thread holds the pool's lock (as a release in progress does)
    # while this one forks; the child then uses the pool.
    holder = threading.Thread(target=_C._pool_hold_lock_for_testing, args=(200,))
    holder.start()
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        _C.pooled_empty([1 << 18], 0)  # pool_acquire, then release
        os._exit(0)
    deadline = time.monotonic() + 10
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            hung += 1
            break
        time.sleep(0.005)
    holder.join()
print(hung)
"""


def test_a_fork_while_another_thread_holds_the_pool_lock():
    # Deterministic: without the atfork handlers every child of this loop
    # inherited a locked mutex and hung in pool_acquire.
    proc = subprocess.run(
        [sys.executable, "-c", _HELD_SCRIPT, "5"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) == 0
