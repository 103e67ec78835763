"""rocm and xpu: the shared Triton kernels registered with AMD and Intel configurations, whose
tiles are checked here against the hardware limits (as data: there is no AMD or Intel GPU)."""

import pytest
import torch

import apt_hal
from apt_hal import registry
from apt_hal.backends import rocm, triton_vendor, xpu
from apt_hal.backends.cuda_triton import hw
from apt_hal.backends.rocm import arch as amd
from apt_hal.backends.xpu import arch as intel

BF16 = 2  # bytes


def _moe_lds_bytes(tile: dict, up: bool) -> int:
    """Shared memory of a MoE GEMM tile: num_stages buffers of activations [BLOCK_M, BLOCK_K] and
    weights [BLOCK_N, BLOCK_K] (the up projection loads a gate and an up weight row per column)."""
    weights = (2 if up else 1) * tile["BLOCK_N"] * tile["BLOCK_K"]
    return tile["num_stages"] * (tile["BLOCK_M"] * tile["BLOCK_K"] + weights) * BF16


def _fp4_lds_bytes(tile: dict) -> int:
    return tile["num_stages"] * (tile["block_m"] + tile["block_n"]) * tile["block_k"] * BF16


def _tiles(vendor):
    for _, up, down in vendor.moe_gemm_tiles:
        yield "moe up", up["BLOCK_M"], up["BLOCK_N"], up["BLOCK_K"], up["num_warps"], _moe_lds_bytes(up, True)
        yield ("moe down", down["BLOCK_M"], down["BLOCK_N"], down["BLOCK_K"], down["num_warps"],
               _moe_lds_bytes(down, False))
    for _, t in vendor.fp4_matmul_tiles:
        yield "fp4_matmul", t["block_m"], t["block_n"], t["block_k"], t["num_warps"], _fp4_lds_bytes(t)


@pytest.mark.parametrize("name", sorted(amd.ARCHES))
def test_amd_tiles_fit_the_architecture(name):
    vendor = amd.ARCHES[name]
    assert vendor.warp_size == 64 and vendor.family == "hip" and not vendor.tma
    nonk = vendor.launch_options["matrix_instr_nonkdim"]
    for what, m, n, k, warps, lds in _tiles(vendor):
        assert lds <= vendor.shared_memory_bytes, (name, what, m, n, k, lds)
        assert m % nonk == 0 and n % nonk == 0, (name, what, m, n)  # whole MFMA tiles
        assert k % amd.MFMA_K[name] == 0 and k % 32 == 0, (name, what, k)  # MFMA K steps, MX blocks
        assert warps <= amd.MAX_WARPS


def test_the_amd_limits_are_the_documented_ones():
    assert amd.ARCHES["gfx942"].shared_memory_bytes == 64 * 1024  # CDNA3 LDS per CU
    assert amd.ARCHES["gfx950"].shared_memory_bytes == 160 * 1024  # CDNA4 LDS per CU


def test_intel_tiles_fit_shared_local_memory_and_dpas():
    m_step, n_step, k_step = intel.DPAS_SHAPE
    for what, m, n, k, warps, lds in _tiles(intel.XE):
        assert lds <= intel.XE.shared_memory_bytes, (what, m, n, k, lds)
        assert m % m_step == 0 and n % n_step == 0 and k % k_step == 0 and k % 32 == 0, (what, m, n, k)
        assert warps <= intel.MAX_WARPS


def test_the_vendor_layer_keeps_nvidia_only_paths_from_amd():
    assert not hw.pure_triton() or hw.interpreting()
    with triton_vendor.using(amd.ARCHES["gfx942"]):
        assert hw.pure_triton()  # no inline PTX
        assert not hw.has_tma()  # ROCm reports capability 9.x: that must not mean Hopper's TMA
        assert hw.moe_gemm_tiles(100, torch.bfloat16)[1] == amd.ARCHES["gfx942"].moe_gemm_tiles[2][2]
        assert hw.launch_options() == {"matrix_instr_nonkdim": 16, "waves_per_eu": 2}
        assert hw.stream_num_warps(16 * 1024) == 4  # 64-lane wavefronts: half the warps of NVIDIA's 8
    assert triton_vendor.current() is triton_vendor.NVIDIA and hw.launch_options() == {}


def test_hardware_tiles_on_request_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("APT_HAL_HARDWARE_TILES", "1")
    with triton_vendor.using(amd.ARCHES["gfx950"]):
        assert hw.fp4_matmul_tiles(8) == amd.ARCHES["gfx950"].fp4_matmul_tiles[0][1]


@pytest.mark.parametrize("backend", ["rocm", "xpu"])
def test_rocm_and_xpu_register_every_shared_kernel(backend):
    registry.activate(backend)
    for op in registry.contracts():
        shared = [i.name.split(".", 1)[1] for i in registry.implementations(op, "cuda-triton")]
        assert [i.name.split(".", 1)[1] for i in registry.implementations(op, backend)] == shared, op


def test_rocm_runs_with_the_configuration_of_its_arch(monkeypatch):
    seen = []
    monkeypatch.setattr(hw, "fp4_matmul_tiles", lambda m, x_parts=1: seen.append(triton_vendor.current().arch)
                        or dict(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1, swap_ab=True))
    monkeypatch.setenv("APT_HAL_ROCM_ARCH", "gfx950")
    w_packed, w_scales = apt_hal.mxfp4.quantize(torch.randn(32, 64))
    x = torch.randn(2, 64)
    with apt_hal.use("rocm", strict=True):
        y = apt_hal.ops.fp4_matmul(x, w_packed, w_scales)
    assert seen == ["gfx950"]
    torch.testing.assert_close(y, x @ apt_hal.mxfp4.dequantize(w_packed, w_scales).T, rtol=1e-5, atol=1e-5)


def test_an_amd_arch_without_a_configuration_declines(monkeypatch):
    monkeypatch.setenv("APT_HAL_ROCM_ARCH", "gfx1100")
    registry.activate("rocm")
    (entry,) = registry.implementations("rotary", "rocm")
    q = torch.randn(1, 2, 1, 8)
    assert entry.supports(q, q, torch.zeros(1, 2, dtype=torch.long), torch.randn(4, 8)) is False


def test_probe_reasons_without_the_vendor_stack(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.version, "hip", None)
    assert rocm.probe().detail == "this torch build has no ROCm support"
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rocm.probe().detail == "no AMD GPU is visible"
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: False)
    assert xpu.probe().detail == "this torch build has no XPU support"
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert xpu.probe().detail == "no Intel GPU is visible"


def test_rocm_probe_names_the_arch(monkeypatch):
    class Props:
        gcnArchName = "gfx942:sramecc+:xnack-"

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "AMD Instinct MI300X")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    assert rocm.probe().detail == "ROCm 6.4, 1 device(s): AMD Instinct MI300X (gfx942)"


def test_interpreter_modes_are_never_automatic():
    for probe in (rocm.probe(), xpu.probe()):
        assert probe.available and probe.device_type == "cpu" and not probe.auto
