"""MetaModule layers with torchmeta's names and ``params=`` convention, task-batched."""

from torch import nn

from mamlext.modules.attention import MetaMultiheadAttention
from mamlext.modules.container import ELEMENTWISE, MetaModuleDict, MetaModuleList, MetaSequential
from mamlext.modules.layers import (
    MetaBilinear,
    MetaConv1d,
    MetaConv2d,
    MetaConv3d,
    MetaEmbedding,
    MetaLinear,
)
from mamlext.modules.metafy import metafy
from mamlext.modules.module import MetaModule, task_batched, task_count
from mamlext.modules.norm import (
    MetaBatchNorm1d,
    MetaBatchNorm2d,
    MetaBatchNorm3d,
    MetaBatchNormBase,
    MetaGroupNorm,
    MetaLayerNorm,
)

__all__ = [
    "MetaModule", "MetaSequential", "MetaModuleList", "MetaModuleDict", "MetaLinear",
    "MetaBilinear", "MetaConv1d", "MetaConv2d", "MetaConv3d", "MetaEmbedding",
    "MetaBatchNorm1d", "MetaBatchNorm2d", "MetaBatchNorm3d", "MetaBatchNormBase",
    "MetaLayerNorm", "MetaGroupNorm", "MetaMultiheadAttention", "batchable",
    "metafy", "task_batched", "task_count",
]  # fmt: skip

# Modules whose task-batched forward mamlext implements (exact types: a subclass may
# override forward), and plain modules that act on each sample independently.
BATCHED_META = (
    MetaSequential, MetaLinear, MetaBilinear, MetaConv1d, MetaConv2d, MetaConv3d,
    MetaEmbedding, MetaBatchNorm1d, MetaBatchNorm2d, MetaBatchNorm3d, MetaLayerNorm,
    MetaGroupNorm, MetaMultiheadAttention,
)  # fmt: skip
PER_SAMPLE = (
    *ELEMENTWISE, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip


def batchable(model: nn.Module) -> bool:
    """Whether every submodule of ``model`` has a task-batched forward in mamlext."""
    for module in model.modules():
        if type(module) in BATCHED_META or type(module) in PER_SAMPLE:
            continue
        if type(module) is nn.Flatten and module.start_dim == 1:
            continue
        return False
    return True
