from scanet.fused._coattention import StackedCoAttention, coattention  # noqa: F401
from scanet.fused._cheb import ChebConv, cheb_conv  # noqa: F401
from scanet.fused._pair_scores import pair_scores  # noqa: F401
