"""Every shape the experiments measure, as data. ResNet-50's are derived from its architecture."""

from bn2d import kernelbench

# KernelBench problem 33's input (bn2d.kernelbench holds it, under KernelBench's names), and a quarter of it.
KERNELBENCH = [(kernelbench.batch_size, kernelbench.features, kernelbench.dim1, kernelbench.dim2), (16, 64, 256, 256)]

# ResNet-50 (torchvision v1.5: the stride sits on the 3x3 conv): stage widths, blocks per stage, strides.
RESNET50_STAGES = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
RESNET50_EXPANSION = 4


def resnet50_bn_shapes(batch: int, image: int = 224):
    """The distinct (N, C, H, W) inputs of ResNet-50's BatchNorm2d layers, in network order."""
    size = image // 2  # stem: 7x7 conv, stride 2
    shapes = [(batch, 64, size, size)]  # the stem's bn1
    size //= 2  # 3x3 max-pool, stride 2
    for width, blocks, stride in RESNET50_STAGES:
        for block in range(blocks):
            s = stride if block == 0 else 1
            shapes.append((batch, width, size, size))  # bn1, after the 1x1 conv
            size //= s
            shapes.append((batch, width, size, size))  # bn2, after the (strided) 3x3 conv
            shapes.append((batch, width * RESNET50_EXPANSION, size, size))  # bn3 and the downsample's bn
    return list(dict.fromkeys(shapes))


# A ladder of sizes at a fixed channel count: 0.5 MB to 0.5 GB of float32 input.
LADDER = [(32, 64, s, s) for s in (8, 16, 32, 64, 128, 256, 512)]

# Planes that are not a whole number of 16-byte vectors, and odd channel counts.
ODD = [(32, 64, 7, 7), (16, 3, 17, 33), (8, 96, 13, 13), (32, 17, 9, 11), (256, 2048, 1, 1)]
# An RGB image batch: rows of three channels, narrower than any vector in channels_last.
RGB = [(64, 3, 224, 224)]

PRESETS = {
    "smoke": KERNELBENCH[1:] + [(32, 256, 56, 56), (32, 2048, 7, 7), (1, 64, 56, 56)],
    "quick": KERNELBENCH + resnet50_bn_shapes(32) + ODD[:2] + RGB,
    "full": KERNELBENCH + [s for b in (1, 32, 256) for s in resnet50_bn_shapes(b)] + LADDER + ODD + RGB,
    # The training batches of ResNet-50: the shapes of the fwd+bwd goals (--modes train_backward).
    "resnet50": [s for b in (32, 256) for s in resnet50_bn_shapes(b)],
}
