"""One thread for the CPU LAPACK calls of merges (QR, SVD, eigh of small factor matrices).

On CPU, jax runs these decompositions through scipy's OpenBLAS, which starts a thread per core.
For the small matrices merges decompose (a LoRA span is (768, 48) at most in a ViT-B), the
threads cost more than they save, and on a machine whose cores are busy (XLA's own pool, another
process) they spin against each other. Measured on 2 cores beside other work: 48 QRs of
(768, 48) took 8.1 s with OpenBLAS's 2 threads and 0.07 s with one; `iso_c` on 24 ViT-B
targets of 3 rank-16 adapters 10.4 s against 0.26 s. The limit holds only inside the context,
and only for the BLAS libraries, so numbers are unchanged and XLA's matmuls are untouched.
"""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def _controller():
    """threadpoolctl's view of the loaded BLAS libraries, jax's LAPACK (scipy's) among them;
    None without threadpoolctl. Built once: looking the libraries up costs ~10 ms a time."""
    try:
        import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jax's CPU LAPACK calls)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded():
    """Runs the body with every loaded BLAS library on one thread (see the module docstring).
    The body must wait for its results inside: jax dispatches asynchronously."""
    controller = _controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield
