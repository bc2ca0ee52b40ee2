"""CUDA tests: on Numba's CUDA simulator, or on a real GPU.

They need their own process, because the simulator is chosen when ``numba.cuda`` is
first imported. ``python -m pytest`` from the repository root runs them through
``tests/test_cuda_simulator.py``, which starts ``python -m pytest tests/cuda`` with
``NUMBA_ENABLE_CUDASIM=1`` (the parent suite ignores this folder: ``collect_ignore``
in ``tests/conftest.py``). By hand:

* ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``: on the simulator;
* ``SPARSEOPT_CUDA_TESTS=gpu python -m pytest tests/cuda``: on the GPU.

Without either, the files here are not collected. On the simulator the launch
configuration is shrunk (16 threads per block, at most 4 blocks, 4 lanes per row)
so that several blocks and the grid-stride loops run on small arrays, and every
kernel launch is checked to receive device arrays only: a host array would be a
silent host round trip on a real GPU.

The simulator's static shared arrays are allocated under a lock here
(:func:`_shared_array_once`): numba-cuda's ``FakeCUDAShared.array`` looks a block's
array up by call site with an unlocked check-then-set, so two simulated threads that
switch between the two each allocate one, and a block's threads stop sharing memory.
That was the rare plan failure under load (a scan read ``np.empty`` garbage); the
short switch interval below made it likelier. ``test_cuda_plan.py`` forces the switch.
"""

import os
import sys

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
GPU = not SIMULATOR and os.environ.get("SPARSEOPT_CUDA_TESTS") == "gpu"

collect_ignore = ["compile_check.py"]


def pytest_ignore_collect(collection_path, config):
    if not (SIMULATOR or GPU) and collection_path.name not in ("conftest.py", "__init__.py"):
        return True
    return None


if SIMULATOR or GPU:
    from sparseopt.kernels import cuda as _kernels

    if SIMULATOR:
        # The simulator runs each block's threads as Python threads that meet at
        # barriers: a short switch interval makes syncthreads() several times faster.
        sys.setswitchinterval(1e-4)
        _kernels.set_launch_config(threads=16, row_threads=16, max_lanes=4, max_blocks=4,
                                   sort_items=4, scan_items=8)

        import numpy as np
        from numba.cuda.simulator import kernel as _sim_kernel

        _launch = _sim_kernel.FakeCUDAKernel.__call__

        def _device_args_only(self, *args):
            if not self._device:
                for arg in args:
                    assert not isinstance(arg, np.ndarray), (
                        f"kernel {self.fn.__name__} got a host array: a host round trip on a GPU")
            return _launch(self, *args)

        _sim_kernel.FakeCUDAKernel.__call__ = _device_args_only

        import threading

        from numba.core import types as _types
        from numba.cuda.simulator import kernelapi as _sim_api
        from numba.np import numpy_support as _numpy_support

        _shared_lock = threading.Lock()
        _shared_array = _sim_api.FakeCUDAShared.array

        def _shared_array_once(self, shape, dtype, alignment=None):
            """``cuda.shared.array`` of the simulator, its per-call-site lookup under a lock.

            The same lookup as numba-cuda's (by the caller's file and line, one array per
            call site and launch), but the get and the store cannot be split by a thread
            switch, which would give two threads of a block two different arrays.
            """
            if shape == 0 or alignment is not None:  # dynamic shared memory: no lookup
                return _shared_array(self, shape, dtype, alignment)
            caller = sys._getframe(1)
            key = (caller.f_code.co_filename, caller.f_lineno)
            with _shared_lock:
                array = self._allocations.get(key)
                if array is None:
                    if isinstance(dtype, _types.Type):
                        dtype = _numpy_support.as_dtype(dtype)
                    array = self._allocations[key] = np.empty(shape, dtype)
            return array

        _sim_api.FakeCUDAShared.array = _shared_array_once
    else:
        _kernels.set_launch_config(threads=64, row_threads=64, max_lanes=32, max_blocks=8,
                                   sort_items=4, scan_items=4)
