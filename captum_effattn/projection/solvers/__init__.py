"""The solvers of efficient and minimal attention (internal; no stable API).

- :mod:`.newton`: the semismooth Newton phase in batched PyTorch, and its exact line search.
- :mod:`.interior`: the interior-point phase for the rows Newton leaves.
- :mod:`.compiled_newton`: the Newton phase compiled row by row with numba (CPU), built from the
  small ``@njit`` kernels of :mod:`.newton_kernels`.
- :mod:`.vertex`: purification and the primal simplex method of minimal attention.
"""
