"""Numeric kernels: float64 references and fast implementations with the same names."""
