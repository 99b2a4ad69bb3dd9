"""Feed the SUPERMOE blocks what a TorchRec model produces: jagged history embeddings instead of padded tensors.

Dimension letters: G sequences (users), L longest history in the batch, D item embedding dim, M model dim, T tasks.

An :class:`~torchrec.modules.embedding_modules.EmbeddingCollection` looks up a history
:class:`~torchrec.sparse.jagged_tensor.KeyedJaggedTensor` and returns one :class:`JaggedTensor` per feature, whose
``values()`` are ``[sum_g len_g, D]`` embeddings and ``lengths()`` the ``[G]`` history lengths. The
:class:`~supermoe_rec.modules.transformer.MoETransformerEncoder` takes left-aligned padded ``[G, L, D]`` histories
and their lengths; :func:`encode_jagged` converts (``to_padded_dense``) and calls it, so::

    encode_jagged(encoder, ec(history_kjt)["history"], context)

equals ``encoder(padded, lengths, context)`` exactly (``tests/modules/test_adapters.py``).

Inside a model that TorchRec's ``TrainPipelineSparseDist`` pipelines, call these from a submodule that holds no
embedding tables (the pipeline fx-traces modules around the sharded ones, and the padding reads ``lengths.max()``,
a data-dependent value), as ``examples/torchrec_pipeline.py`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from supermoe_rec.modules.transformer import EncoderOutput, MoETransformerEncoder

__all__ = ["encode_jagged", "jagged_to_padded"]


def jagged_to_padded(history: JaggedTensor) -> tuple[Tensor, Tensor]:
    """Pad a jagged batch of item embeddings to the encoder's layout.

    Args:
        history: G sequences; ``values()`` ``[N, D]`` item vectors in time order (oldest first), ``lengths()`` ``[G]``.

    Returns:
        ``(padded, lengths)``: ``[G, L, D]`` left-aligned with zeros after each row's length (L = the longest
        length, 0 for an all-empty batch) and ``[G]`` int64 lengths.

    Example::

        >>> jt = JaggedTensor(values=torch.arange(6.0).view(3, 2), lengths=torch.tensor([2, 0, 1]))
        >>> padded, lengths = jagged_to_padded(jt)
        >>> padded.shape, lengths.tolist()
        (torch.Size([3, 2, 2]), [2, 0, 1])
        >>> padded[2].tolist()  # one item, then padding
        [[4.0, 5.0], [0.0, 0.0]]
    """
    values = history.values()
    if values.dim() != 2:
        raise ValueError(f"history.values() must be [N, D] item embeddings, got {list(values.shape)}")
    lengths = history.lengths().long()  # (G,)
    G, D = lengths.numel(), values.shape[1]
    L = int(lengths.max().item()) if G > 0 else 0
    if L == 0:
        return values.new_zeros(G, 0, D), lengths  # (G, 0, D)
    padded = history.to_padded_dense(desired_length=L, padding_value=0.0)  # (G, L, D)
    return padded, lengths


def encode_jagged(
    encoder: MoETransformerEncoder, history: JaggedTensor, context: Tensor | None = None
) -> EncoderOutput:
    """Run ``encoder`` on jagged history embeddings (e.g. one feature of an EmbeddingCollection's output).

    Args:
        encoder: the SUPERMOE encoder; its ``input_dim`` must equal the embeddings' width D.
        history: G sequences of ``[len_g, D]`` item embeddings (see :func:`jagged_to_padded`).
        context: optional ``[G, M]`` added to the ``[USER]`` and task tokens.

    Returns:
        the encoder's :class:`~supermoe_rec.modules.transformer.EncoderOutput`: ``user`` ``[G, M]``, ``tasks``
        ``[G, T, M]`` and the MoE statistics, identical to ``encoder(padded, lengths, context)``.

    Example::

        >>> from supermoe_rec.config.experiment import EncoderConfig, ModelConfig, MoEConfig
        >>> _ = torch.manual_seed(0)
        >>> encoder = EncoderConfig(d_model=16, num_layers=1, num_heads=2)
        >>> cfg = ModelConfig(encoder=encoder, moe=MoEConfig(num_experts=4, moe_every=1))
        >>> enc = MoETransformerEncoder(cfg, num_tasks=2, input_dim=8)
        >>> jt = JaggedTensor(values=torch.randn(5, 8), lengths=torch.tensor([3, 0, 2]))
        >>> out = encode_jagged(enc, jt)
        >>> out.user.shape, out.tasks.shape
        (torch.Size([3, 16]), torch.Size([3, 2, 16]))
    """
    padded, lengths = jagged_to_padded(history)
    out: EncoderOutput = encoder(padded, lengths, context)
    return out


# Leaf functions for torch.fx: the padding width is data-dependent, so a tracer must not look inside.
torch.fx.wrap("jagged_to_padded")
torch.fx.wrap("encode_jagged")
