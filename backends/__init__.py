"""The built-in backends. Each is one package here: ``__init__.py`` declares it (plain data and a
cheap probe, no vendor import) and ``impls.py`` registers its implementations when activated.

To add a backend: copy ``cpu/`` as a template, write its probe, list it below. Out-of-tree
backends need no change here: they declare an entry point in the group ``apt_hal.backends``.
"""

from apt_hal.backends.cpu import BACKEND as _cpu
from apt_hal.backends.cuda_triton import BACKEND as _cuda_triton
from apt_hal.backends.hpu import BACKEND as _hpu
from apt_hal.backends.huawei_cloud import BACKEND as _huawei_cloud
from apt_hal.backends.npu import BACKEND as _npu
from apt_hal.backends.rocm import BACKEND as _rocm
from apt_hal.backends.xpu import BACKEND as _xpu

# Listed in the order of their auto_rank (CUDA > HPU > NPU > XPU > CPU, then the remote one, which
# "auto" never picks); the ranks, not this order, decide what "auto" chooses.
BUILTIN_BACKENDS = (_cuda_triton, _rocm, _hpu, _npu, _xpu, _cpu, _huawei_cloud)
