"""Fused drop-ins for the eager ops and layers (Triton on CUDA / under the interpreter, scanet.native on CPU,
else the eager reference). ``import scanet.fused`` needs no triton: the kernels are imported when first run."""

from scanet.fused._cheb import ChebConv, cheb_conv  # noqa: F401
from scanet.fused._coattention import StackedCoAttention, coattention  # noqa: F401
from scanet.fused._dispatch import PRECISIONS, default_precision, kernels_can_run  # noqa: F401
from scanet.fused._head import SimilarityHead  # noqa: F401
from scanet.fused._image import ImageEncoder  # noqa: F401
from scanet.fused._pair_scores import pair_scores  # noqa: F401
