"""Process-wide settings the Numba kernels depend on, applied once before any kernel compiles.

* Threading layer: ``omp``. The server calls parallel kernels from several Python threads at
  once (a training job and inference requests); Numba's ``workqueue`` layer aborts the process
  when that happens, and ``tbb`` needs a matching TBB build. ``NUMBA_THREADING_LAYER`` overrides.
* Kernel cache: compiled kernels are cached on disk (``cache=True``) under ``NUMBA_CACHE_DIR``,
  defaulting to ``$XDG_CACHE_HOME/cnnd/numba``, so only the first start pays for compilation.
* BLAS threads: the kernels parallelise over samples with ``prange`` and call BLAS (``np.dot``)
  inside; BLAS must then stay single-threaded, or its own threads oversubscribe the cores
  (measured about 20x slower on two cores, with OpenBLAS warning about OpenMP loops).
"""

from __future__ import annotations

import os
from pathlib import Path


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "cnnd" / "numba")


os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
os.environ.setdefault("NUMBA_CACHE_DIR", _default_cache_dir())
# Idle OpenMP threads sleep instead of spinning. Spinning wins on an idle machine by a few
# microseconds per parallel region, but when other processes (or a training job beside
# inference) hold the cores, spinning threads wait for descheduled ones: measured here, LeNet-5
# training at batch 1 fell from ~1,000 to ~60 samples/s under a load average of 3.5.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402  (configured through the environment above)

# numba may have been imported by the caller before us, in which case its config already
# holds the defaults; set the two values directly as well.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]
if not numba.config.CACHE_DIR:
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def _limit_blas_threads() -> None:
    """Hold the BLAS that Numba's np.dot calls (SciPy's) to one thread."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library so it can be found)
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas").lib_controllers
    # NumPy's wheel ships its own OpenBLAS (numpy.libs/libscipy_openblas64_*), which stays
    # multi-threaded for the caller's own matrix products; limit only SciPy's copy, unless
    # both are one system library.
    scipy_blas = [lib for lib in blas if "numpy" not in lib.filepath] or blas
    for lib in scipy_blas:
        lib.set_num_threads(1)


_limit_blas_threads()


def num_threads() -> int:
    """Threads the parallel kernels use (``NUMBA_NUM_THREADS``, default: all cores)."""
    return int(numba.get_num_threads())


def threading_layer() -> str:
    """The threading layer in use, once a parallel kernel has run; else the configured one."""
    try:
        return str(numba.threading_layer())
    except ValueError:
        return str(numba.config.THREADING_LAYER)
