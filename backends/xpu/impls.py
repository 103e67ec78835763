"""xpu implementations.

None are registered yet: every op runs its contract's reference on the Intel GPU
(``apt_hal.explain()`` says so). intel-extension-for-pytorch is optional and not imported.
"""
