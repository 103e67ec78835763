"""npu implementations.

Importing torch_npu registers torch's "npu" device (it renames PrivateUse1; apt_hal never does).
No native implementations are registered yet: every op runs its contract's reference on the
Ascend device (``apt_hal.explain()`` says so).
"""

import torch_npu  # noqa: F401  (registers the npu device with torch)
