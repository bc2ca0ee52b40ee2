"""Numba settings, in one place.

``SPARSEOPT_NUMBA_CACHE=0`` turns the on-disk kernel cache off (default on: a cold
compile of one optimizer's kernels takes seconds, loading them from the cache
milliseconds; see README "First call and caching").

No ``fastmath``: NaN and Inf must propagate exactly as in Keras, and results must
not depend on the CPU's contraction choices.

``error_model="numpy"``: a float division by zero gives Inf or NaN as in IEEE
arithmetic (and in Keras), where Numba's default (Python's rules) raises
``ZeroDivisionError`` and puts a branch in every division. Numba compiles the body of
a ``prange`` loop this way already; the flag makes the serial helpers and the code
around the loops agree with it.
"""

import os

CACHE = os.environ.get("SPARSEOPT_NUMBA_CACHE", "1").lower() not in ("0", "false", "no")

#: Flags of the CPU kernels that run the rules.
CPU_KERNEL_FLAGS = dict(parallel=True, cache=CACHE, nogil=True, error_model="numpy")
#: Flags of the sequential helpers (de-duplication, validation).
CPU_SERIAL_FLAGS = dict(cache=CACHE, nogil=True, error_model="numpy")
#: Flags with which a rule is compiled for inlining into the CPU kernels.
CPU_RULE_FLAGS = dict(inline="always", error_model="numpy")

MAX_SLOTS = 3
