"""'auto' precision against the hardware it runs on: CPU families by their /proc/cpuinfo flags, GPUs by capability."""
import pytest

from deepcnn.precision import choose_precision, detect_precision, read_cpu_flags

# /proc/cpuinfo "flags" lines, abbreviated to the SIMD flags that tell the families apart.
SKYLAKE_SP = "fpu sse4_2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl"
CASCADE_LAKE = SKYLAKE_SP + " avx512_vnni"
ICE_LAKE = CASCADE_LAKE + " avx512ifma avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq avx512_bitalg avx512_vpopcntdq"
COOPER_LAKE = CASCADE_LAKE + " avx512_bf16"
SAPPHIRE_RAPIDS = ICE_LAKE + " avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ZEN_3 = "fpu sse4_2 sse4a avx f16c fma avx2 vaes vpclmulqdq"
ZEN_4 = ZEN_3 + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni"


@pytest.mark.parametrize("flags,expected", [
    (SKYLAKE_SP, "32-true"),
    (CASCADE_LAKE, "32-true"),
    (ICE_LAKE, "32-true"),
    (COOPER_LAKE, "bf16-mixed"),
    (SAPPHIRE_RAPIDS, "bf16-mixed"),
    (ZEN_3, "32-true"),
    (ZEN_4, "bf16-mixed"),
    ("", "32-true"),
], ids=["skylake-sp", "cascade-lake", "ice-lake", "cooper-lake", "sapphire-rapids", "zen3", "zen4", "no-cpuinfo"])
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_auto_on_the_cpu_is_bf16_only_with_native_bf16(flags, expected, accelerator):
    precision, reason = choose_precision("auto", accelerator, set(flags.split()), None)
    assert precision == expected
    assert reason.startswith(f"auto: {expected}, the CPU") and "\n" not in reason


@pytest.mark.parametrize("gpu,capability,expected", [
    ("V100", (7, 0), "16-mixed"),
    ("T4", (7, 5), "16-mixed"),
    ("A100", (8, 0), "bf16-mixed"),
    ("H100", (9, 0), "bf16-mixed"),
])
@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_auto_on_cuda_is_bf16_from_capability_8(gpu, capability, expected, accelerator):
    # The host CPU's flags do not matter on the GPU.
    precision, reason = choose_precision("auto", accelerator, set(ZEN_3.split()), capability)
    assert precision == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in reason


def test_a_cpu_run_ignores_the_gpu():
    assert choose_precision("auto", "cpu", set(ZEN_3.split()), (9, 0))[0] == "32-true"


@pytest.mark.parametrize("requested,expected", [("32", "32"), (32, "32"), ("bf16-mixed", "bf16-mixed"),
                                                ("16-mixed", "16-mixed"), ("32-true", "32-true")])
def test_explicit_precision_passes_through(requested, expected):
    for flags, capability in [(SAPPHIRE_RAPIDS, None), (ZEN_3, (7, 5)), (ZEN_3, (9, 0))]:
        precision, reason = choose_precision(requested, "auto", set(flags.split()), capability)
        assert precision == expected and reason == f"precision {expected} as configured"


def test_cpu_flags_come_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    processor = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\nflags\t\t: {ZEN_4}\nbugs\t\t: sysret_ss_attrs\n\n"
    cpuinfo.write_text(processor.format(0) + processor.format(1))
    assert read_cpu_flags(cpuinfo) == set(ZEN_4.split())
    assert read_cpu_flags(tmp_path / "missing") == set()


def test_detect_precision_on_this_machine():
    precision, reason = detect_precision("auto", "cpu")
    assert (precision, reason) == choose_precision("auto", "cpu", read_cpu_flags(), None)
    assert detect_precision(32, "auto") == ("32", "precision 32 as configured")
