"""The dispatch rules, pinned: the default plan for representative shapes and on both sides of every threshold
(one element apart where the shape allows), for each backend and operation. Meta tensors: a plan needs shapes,
dtypes and pointers (a meta tensor's is 0, so aligned), not data."""
import pytest
import torch
from conftest import DEVICE, make_params

from bn2d import CudaConfig, TritonConfig, cuda_module, dispatch, explain

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
MB = 1 << 20


def meta(shape, dtype=F32, layout="nchw"):
    x = torch.empty(shape, dtype=dtype, device="meta")
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def ids(case):
    shape, dtype, layout = case[:3]
    return f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{layout}"


# (shape, dtype, layout, config) -> (kernel, launch parameters)
CUDA_EVAL = [
    # SMALL_BYTES: 16 MB of float32 whole-vector planes take the small kernel; a vector's worth more, tiles.
    ((1, 1, 4, MB), F32, "nchw", CudaConfig(), "small_kernel", dict(vec=4, whole=True, threads=256)),
    ((1, 1, 1, 4 * MB + 1), F32, "nchw", CudaConfig(), "nchw_kernel",
     dict(vec=4, whole=False, long_planes=True, threads=256)),
    # SMALL_NARROW_BYTES: 16-bit vectors that straddle planes, up to 2 MB small.
    ((1, 1, 1, MB - 1), F16, "nchw", CudaConfig(), "small_kernel", dict(vec=8, whole=False, threads=256)),
    ((1, 1, 1, MB + 1), F16, "nchw", CudaConfig(), "nchw_kernel",
     dict(vec=8, whole=False, long_planes=True, threads=256)),
    # Long planes: at least a tile (threads x UNROLL x vec elements) need no table.
    ((1, 1, 64, 64), F32, "nchw", CudaConfig(small=0), "nchw_kernel",
     dict(vec=4, whole=True, long_planes=True, threads=256)),
    ((1, 1, 1, 4092), F32, "nchw", CudaConfig(small=0), "nchw_kernel",
     dict(vec=4, whole=True, long_planes=False, threads=256)),
    # ResNet-50 shapes: 7x7 planes straddle, 14x14 16-bit take 8-byte vectors.
    ((32, 256, 56, 56), F32, "nchw", CudaConfig(), "nchw_kernel",
     dict(vec=4, whole=True, long_planes=False, threads=256)),
    ((32, 2048, 7, 7), F16, "nchw", CudaConfig(), "nchw_kernel",
     dict(vec=8, whole=False, long_planes=False, threads=256)),
    ((32, 256, 14, 14), BF16, "nchw", CudaConfig(), "small_kernel", dict(vec=4, whole=True, threads=256)),
    ((2, 3, 7, 7), F64, "nchw", CudaConfig(vectorized=False), "small_kernel", dict(vec=1, whole=True, threads=256)),
    # channels_last: SMALL_BYTES, then 16-bit rows of half vectors up to SMALL_NARROW_BYTES.
    ((1, MB, 2, 2), F32, "channels_last", CudaConfig(), "small_channels_last_kernel",
     dict(vec=4, rows=4, threads=128)),
    ((1, MB + 4, 2, 2), F32, "channels_last", CudaConfig(), "channels_last_kernel", dict(vec=4, threads=256)),
    ((1, MB // 4, 2, 2), F16, "channels_last", CudaConfig(), "small_channels_last_kernel",
     dict(vec=4, rows=2, threads=128)),
    ((1, MB // 4 + 8, 2, 2), F16, "channels_last", CudaConfig(), "small_channels_last_kernel",
     dict(vec=8, rows=4, threads=128)),
    ((256, 2048, 7, 7), F32, "channels_last", CudaConfig(threads=1024), "channels_last_kernel",
     dict(vec=4, threads=512)),
    # FLAT_BYTES: NCHW vectors that straddle planes, a pair per element up to 512 KB (planes shorter than a
    # vector too); 16-bit ones in 8-byte vectors up to SMALL_NARROW_BYTES.
    ((1, 1, 1, 256 * 1024 - 1), F16, "nchw", CudaConfig(), "flat_kernel", dict(vec=4, threads=256)),
    ((1, 1, 1, 256 * 1024 + 1), F16, "nchw", CudaConfig(), "small_kernel", dict(vec=8, whole=False, threads=256)),
    ((16, 3, 17, 33), BF16, "nchw", CudaConfig(), "flat_kernel", dict(vec=4, threads=256)),
    ((64, 8, 3, 3), F32, "nchw", CudaConfig(), "flat_kernel", dict(vec=4, threads=256)),
    # 1x1 planes: NCHW memory is NHWC; a row of 3 channels is no vector: the flat kernel, whatever the size,
    # unless a grid-stride grid is asked for.
    ((8, 64, 1, 1), F32, "nchw", CudaConfig(), "small_channels_last_kernel", dict(vec=4, rows=4, threads=128)),
    ((1, 3, 512, 682), F16, "channels_last", CudaConfig(), "flat_kernel", dict(vec=4, threads=256)),
    ((1, 3, 512, 683), F16, "channels_last", CudaConfig(), "flat_kernel", dict(vec=8, threads=256)),
    ((32, 3, 224, 224), F16, "channels_last", CudaConfig(), "flat_kernel", dict(vec=8, threads=256)),
    ((256, 3, 224, 224), F16, "channels_last", CudaConfig(), "flat_kernel", dict(vec=8, threads=256)),
    ((32, 17, 9, 11), F32, "channels_last", CudaConfig(), "flat_kernel", dict(vec=4, threads=256)),
    ((256, 3, 224, 224), F16, "channels_last", CudaConfig(blocks_per_sm=2), "channels_last_kernel",
     dict(vec=1, threads=256)),
]


@pytest.mark.parametrize("shape, dtype, layout, config, kernel, launch", CUDA_EVAL, ids=map(ids, CUDA_EVAL))
def test_cuda_eval_plan(shape, dtype, layout, config, kernel, launch):
    plan = dispatch.cuda_eval(meta(shape, dtype, layout), None, None, None, None, config=config)
    assert (plan.kernels, plan.launch) == ((kernel,), launch)


def test_cuda_eval_plan_reads_the_pointers():
    """A misaligned x or output takes single elements; misaligned parameters keep channels_last off its small
    kernel's vector loads. The hot path's plan (pointers=False) assumes alignment: the bound call checks it."""
    x = torch.empty(2 * 8 * 16 + 1, device="meta")[1:].view(2, 8, 4, 4)
    assert dispatch.cuda_eval(x, None, None, None, None).launch["vec"] == 1
    assert dispatch.cuda_eval(x, None, None, None, None, pointers=False).launch["vec"] == 4
    x = meta((4, 8, 2, 2), layout="channels_last")
    weight = torch.empty(9, device="meta")[1:]
    assert dispatch.cuda_eval(x, weight, None, None, None).kernels == ("channels_last_kernel",)


# (shape, dtype, layout, config) -> training kernels
CUDA_TRAIN = [
    # CHANNEL_BLOCK_BYTES: a channel of 112 KB in a block, one more plane row of it not.
    ((1, 1, 112, 256), F32, "nchw", CudaConfig(), ("channel_kernel",)),
    ((1, 1, 113, 256), F32, "nchw", CudaConfig(), ("nchw_stats_kernel", "finalize_stats_kernel")),
    # GRID_MIN_CHANNEL_BYTES: 32 MB float32 channels on the persistent grid; forced (fused=1) below it.
    ((1, 1, 2048, 4096), F32, "nchw", CudaConfig(), ("fused_nchw_kernel",)),
    ((1, 1, 2048, 4095), F32, "nchw", CudaConfig(), ("nchw_stats_kernel", "finalize_stats_kernel")),
    ((1, 1, 2048, 4095), F32, "nchw", CudaConfig(fused=1), ("fused_nchw_kernel",)),
    ((1, 1, 2048, 4096), F16, "nchw", CudaConfig(), ("nchw_stats_kernel", "finalize_stats_kernel")),
    ((64, 64, 512, 512), F32, "nchw", CudaConfig(), ("fused_nchw_kernel",)),
    ((64, 64, 512, 512), F32, "nchw", CudaConfig(fused=0), ("nchw_stats_kernel", "finalize_stats_kernel")),
    # channels_last groups: GROUP_MIN_BLOCKS groups of GROUP_BYTES, and their rows within CHANNEL_BLOCK_BYTES.
    ((32, 1024, 7, 7), F16, "channels_last", CudaConfig(), ("channel_group_kernel",)),
    ((32, 1008, 7, 7), F16, "channels_last", CudaConfig(), ("channels_last_stats_kernel", "finalize_stats_kernel")),
    ((1, 1024, 56, 64), F16, "channels_last", CudaConfig(), ("channel_group_kernel",)),
    ((1, 1024, 57, 64), F16, "channels_last", CudaConfig(), ("channels_last_stats_kernel", "finalize_stats_kernel")),
    ((32, 2048, 7, 7), F32, "channels_last", CudaConfig(fused=0),
     ("channels_last_stats_kernel", "finalize_stats_kernel")),
]


@pytest.mark.parametrize("shape, dtype, layout, config, kernels", CUDA_TRAIN, ids=map(ids, CUDA_TRAIN))
def test_cuda_train_plan(shape, dtype, layout, config, kernels):
    assert dispatch.cuda_train(meta(shape, dtype, layout), config=config).kernels == kernels


@pytest.mark.parametrize("shape, dtype, vec", [((2, 3, 8, 8), F32, 4), ((2, 3, 5, 6), F32, 2), ((2, 3, 7, 7), F32, 1),
                                               ((4, 16, 14, 14), F16, 4), ((2, 3, 4, 4), F64, 2)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_cuda_channel_kernel_vectors(shape, dtype, vec):
    """The block per channel takes 16-byte vectors, else 8-byte ones, else single elements."""
    assert dispatch.cuda_train_plan(meta(shape, dtype), None, "channel_kernel").launch["vec"] == vec


# (shape, dtype, layout, config) -> (kernel, selected launch parameters)
TRITON_EVAL = [
    # FLAT_ELEMENTS: 16-bit tensors above it take tiles, unless NCHW planes are not whole 16-element rows.
    ((1, 1, 512, 1024), F16, "nchw", TritonConfig(), "normalize_flat_kernel", dict(BLOCK=512, PLANES=0)),
    ((1, 1, 512, 1040), F16, "nchw", TritonConfig(), "normalize_kernel", dict(BLOCK_R=1, BLOCK_L=2048)),
    ((1, 1, 513, 1025), F16, "nchw", TritonConfig(), "normalize_flat_kernel", dict(BLOCK=1024, PLANES=2)),
    ((1, 1, 512, 1024), F32, "nchw", TritonConfig(), "normalize_flat_kernel", dict(BLOCK=512, PLANES=0)),
    ((1, 1, 512, 1025), F32, "nchw", TritonConfig(), "normalize_flat_kernel", dict(BLOCK=512, PLANES=2)),
    ((4, 16, 99, 99), F16, "nchw", TritonConfig(), "normalize_flat_kernel", dict(BLOCK=1024, PLANES=2)),
    ((2, 32, 96, 96), F16, "channels_last", TritonConfig(), "normalize_kernel", dict(BLOCK_R=256, BLOCK_L=32)),
    # SMALL_ELEMENTS: NCHW tiles a quarter of TILE_ELEMENTS up to it.
    ((1, 1, 2048, 2048), F16, "nchw", TritonConfig(), "normalize_kernel", dict(BLOCK_R=1, BLOCK_L=2048)),
    ((1, 1, 2048, 2064), F16, "nchw", TritonConfig(), "normalize_kernel", dict(BLOCK_R=1, BLOCK_L=4096)),
    ((1, 1, 2048, 2048), F16, "nchw", TritonConfig(4, 512, 8), "normalize_kernel",
     dict(BLOCK_R=4, BLOCK_L=512, num_warps=8)),
]


@pytest.mark.parametrize("shape, dtype, layout, config, kernel, launch", TRITON_EVAL, ids=map(ids, TRITON_EVAL))
def test_triton_eval_plan(shape, dtype, layout, config, kernel, launch):
    plan = dispatch.triton_eval(meta(shape, dtype, layout), config)
    assert plan.kernels == (kernel,) and {k: plan.launch[k] for k in launch} == launch


TRITON_TRAIN = [
    # CHANNEL_TILE_ELEMENTS: padded to powers of two, a channel (NCHW) or GROUP_CHANNELS channels of every
    # row (channels_last) in one tile.
    ((4, 1, 64, 64), F32, "nchw", ("channel_kernel",)),
    ((4, 1, 64, 65), F32, "nchw", ("stats_kernel", "finalize_kernel")),
    ((2, 16, 32, 32), F32, "channels_last", ("channel_group_kernel",)),
    ((2, 16, 32, 33), F32, "channels_last", ("stats_kernel", "finalize_kernel")),
]


@pytest.mark.parametrize("shape, dtype, layout, kernels", TRITON_TRAIN, ids=map(ids, TRITON_TRAIN))
def test_triton_train_plan(shape, dtype, layout, kernels):
    assert dispatch.triton_train(meta(shape, dtype, layout)).kernels == kernels


def test_explain_names_what_a_call_runs():
    """explain: one plan for eval and one-kernel training, the statistics' and the normalisation's for three
    kernels; PyTorch's own where the tensor is on the CPU for a CUDA backend."""
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    params = make_params(4)
    [plan] = explain(x, *params, backend="triton")
    assert plan.op == "eval" and plan.layout == "nchw" and plan.why
    [plan] = explain(x, *params, training=True, backend="triton")
    assert plan.kernels == ("channel_kernel",)
    big = torch.randn(4, 2, 64, 65, device=DEVICE)
    assert [p.kernels for p in explain(big, *make_params(2), training=True, backend="triton")] == [
        ("stats_kernel", "finalize_kernel"), ("normalize_flat_kernel",)]
    if DEVICE == "cpu":
        assert explain(x, *params, backend="cuda")[0].kernels == ("F.batch_norm",)
    assert explain(x, *params, backend="torch")[0].backend == "torch"


def test_no_rule_in_cpp():
    """The C++ side launches what it is told: the rules' thresholds appear in dispatch.py only, and the
    constants both sides need are the same."""
    source = cuda_module.CUDA_SOURCE + cuda_module.CPP_SOURCE
    for name in ("SMALL_BYTES", "SMALL_NARROW_BYTES", "DEFAULT_THREADS", "CHANNEL_BLOCK_BYTES", "GRID_MIN"):
        assert name not in source
    for name in ("VEC_BYTES", "UNROLL", "CHANNELS_LAST_MAX_THREADS", "GROUP_BYTES"):
        assert f"constexpr int {name} = {getattr(dispatch, name)};" in source or (
            f"{name} = {getattr(dispatch, name)}" in source), name
