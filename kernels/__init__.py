"""Numeric kernels: float64 references and fast implementations with the same names.

CPU kernels: ``moments`` (pair moments; the fused numba loop of ``cpu_moments`` and
``numba_decode`` where numba is installed, torch otherwise), ``svd``, ``balance``, ``assign``;
storage formats and their pair moments: ``stored``, ``stored_moments``; sketches and
checks: ``sketch``, ``lattice``, ``batched``.  On CUDA the fast versions dispatch to
Triton (``triton_kernels``, ``triton_decode``; imported only when used).
"""
