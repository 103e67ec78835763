"""hpu implementations.

Importing the bridge registers torch's "hpu" device. No native implementations are registered
yet: every op runs its contract's reference on the Gaudi device (``apt_hal.explain()`` says so).
"""

import habana_frameworks.torch.core  # noqa: F401  (registers the hpu device with torch)
