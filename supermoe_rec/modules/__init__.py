"""Building blocks: embeddings (SparseArch), gating, experts, MoE, transformer encoder, towers, baselines."""
