"""Triton kernels of the fusedaccum ops (installed as fusedaccum.triton_kernels)."""
