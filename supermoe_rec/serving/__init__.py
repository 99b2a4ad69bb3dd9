"""Serving a trained run without the training stack: the inference artifact, :class:`UserEncoder`, embed and retrieve.

Importing this package (and using :class:`UserEncoder`) needs torch, numpy and pandas only: no TorchRec, no fbgemm,
no process group. The training-side writer is :mod:`supermoe_rec.serving.export_artifact` (imports TorchRec).
See ``docs/serving.md``.
"""

from __future__ import annotations

from supermoe_rec.serving.artifact import ArtifactError, artifact_bytes, read_manifest, verify
from supermoe_rec.serving.encoder import Encoded, UserEncoder

__all__ = ["ArtifactError", "Encoded", "UserEncoder", "artifact_bytes", "read_manifest", "verify"]
