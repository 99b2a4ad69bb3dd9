"""Prove the installed stack loads: torch, fbgemm_gpu, torchrec, and one tiny EmbeddingBagCollection forward.

Run by ``scripts/bootstrap.sh`` after install; ``python -m supermoe_rec.env_check`` exits non-zero with the reason.
"""

from __future__ import annotations

import sys


def check() -> str:
    """Import the stack and run one EBC forward; return a one-line description of what loaded."""
    import fbgemm_gpu  # noqa: F401  (loads the fbgemm operator libraries)
    import torch
    import torchrec
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]))
    pooled = ebc(kjt).to_dict()["f"]
    if tuple(pooled.shape) != (2, 4):
        raise RuntimeError(f"EmbeddingBagCollection returned shape {tuple(pooled.shape)}, expected (2, 4)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__}, torchrec {torchrec.__version__}, fbgemm_gpu loaded, device {device}"


def main() -> int:
    try:
        print(f"env_check: ok ({check()})")
    except Exception as exc:  # report any failure to load as one clear message
        print(f"env_check: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
