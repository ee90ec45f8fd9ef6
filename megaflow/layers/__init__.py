"""Tensor-parallel building blocks the model is made of."""
from megaflow.layers.cross_entropy import VocabParallelCrossEntropy, vocab_parallel_cross_entropy  # noqa: F401
from megaflow.layers.embedding import VocabParallelEmbedding  # noqa: F401
from megaflow.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear  # noqa: F401
from megaflow.layers.norm import LayerNorm, RMSNorm, build_norm  # noqa: F401
