"""rocm implementations.

None are registered yet: every op runs its contract's reference on the GPU (``apt_hal.explain()``
says so). The Triton kernels of cuda-triton are meant to be registered here once they are
checked on AMD hardware.
"""
