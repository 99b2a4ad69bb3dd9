"""supermoe_rec: universal user representations with a sparse MoE transformer and multi-task towers on TorchRec.

The public API, importable from the package root::

    from supermoe_rec import MoETransformerEncoder, MultiTaskTowers, TaskIndicatorLoss, encode_jagged

- encoder: :class:`MoETransformerEncoder` (returns :class:`EncoderOutput`), :func:`encode_jagged` and
  :func:`jagged_to_padded` for TorchRec ``JaggedTensor`` histories;
- MoE: :class:`MoELayer` (returns :class:`MoEOutput`), :class:`TopKRouter`;
- towers and loss: :class:`MultiTaskTowers`, :class:`TaskTower`, :class:`TaskIndicatorLoss` (returns
  :class:`LossOutput`), :class:`TaskSpec`, :class:`TaskType`;
- models: :class:`SuperMoERec` (returns :class:`ModelOutput`), :func:`build_model`, :class:`TrainModule` (returns
  ``(loss, StepOutput)`` for TorchRec's train pipelines), :class:`SparseArch` (the TorchRec tables), :class:`Batch`;
- configs: :class:`ExperimentConfig`, :class:`ModelConfig`, :class:`EncoderConfig`, :class:`MoEConfig`,
  :class:`LossConfig`, :func:`load_config`.

**Lazy imports.** ``import supermoe_rec`` imports neither torch nor torchrec (about 0.01 s instead of about 5 s on
2 CPU cores): each name above is imported from its module on first access (PEP 562 module ``__getattr__``), so
``supermoe-rec --help`` and config tools start fast. ``from supermoe_rec import X`` works as usual, and type checkers
and IDEs see the real definitions through the ``TYPE_CHECKING`` imports below.

Example::

    >>> import supermoe_rec
    >>> supermoe_rec.MoEConfig(num_experts=16).top_k
    2
    >>> "TaskIndicatorLoss" in supermoe_rec.__all__
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # encoder and its TorchRec adapters
    "MoETransformerEncoder": "supermoe_rec.modules.transformer",
    "EncoderOutput": "supermoe_rec.modules.transformer",
    "encode_jagged": "supermoe_rec.modules.adapters",
    "CausalMoEEncoder": "supermoe_rec.modules.causal",
    "CausalEncoderOutput": "supermoe_rec.modules.causal",
    "jagged_to_padded": "supermoe_rec.modules.adapters",
    # sparse MoE
    "MoELayer": "supermoe_rec.modules.moe",
    "MoEOutput": "supermoe_rec.modules.moe",
    "TopKRouter": "supermoe_rec.modules.gating",
    # towers, loss, tasks
    "MultiTaskTowers": "supermoe_rec.modules.towers",
    "TaskTower": "supermoe_rec.modules.towers",
    "TaskIndicatorLoss": "supermoe_rec.objectives.task_indicator",
    "LossOutput": "supermoe_rec.objectives.task_indicator",
    "TaskSpec": "supermoe_rec.config.tasks",
    "TaskType": "supermoe_rec.config.experiment",
    # models
    "SuperMoERec": "supermoe_rec.models.supermoe",
    "ModelOutput": "supermoe_rec.models.supermoe",
    "build_model": "supermoe_rec.models.factory",
    "TrainModule": "supermoe_rec.models.train_module",
    "StepOutput": "supermoe_rec.models.train_module",
    "SparseArch": "supermoe_rec.modules.embeddings",
    "Batch": "supermoe_rec.data.batch",
    # configs
    "ExperimentConfig": "supermoe_rec.config.experiment",
    "ModelConfig": "supermoe_rec.config.experiment",
    "EncoderConfig": "supermoe_rec.config.experiment",
    "MoEConfig": "supermoe_rec.config.experiment",
    "LossConfig": "supermoe_rec.config.experiment",
    "load_config": "supermoe_rec.config.experiment",
}

# A literal list, so linters see what the TYPE_CHECKING imports are for; must name exactly _EXPORTS' keys.
__all__ = [
    "Batch",
    "CausalEncoderOutput",
    "CausalMoEEncoder",
    "EncoderConfig",
    "EncoderOutput",
    "ExperimentConfig",
    "LossConfig",
    "LossOutput",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoETransformerEncoder",
    "ModelConfig",
    "ModelOutput",
    "MultiTaskTowers",
    "SparseArch",
    "StepOutput",
    "SuperMoERec",
    "TaskIndicatorLoss",
    "TaskSpec",
    "TaskTower",
    "TaskType",
    "TopKRouter",
    "TrainModule",
    "__version__",
    "build_model",
    "encode_jagged",
    "jagged_to_padded",
    "load_config",
]

if TYPE_CHECKING:  # the real definitions, for type checkers and IDEs; at run time see __getattr__
    from supermoe_rec.config.experiment import (
        EncoderConfig,
        ExperimentConfig,
        LossConfig,
        ModelConfig,
        MoEConfig,
        TaskType,
        load_config,
    )
    from supermoe_rec.config.tasks import TaskSpec
    from supermoe_rec.data.batch import Batch
    from supermoe_rec.models.factory import build_model
    from supermoe_rec.models.supermoe import ModelOutput, SuperMoERec
    from supermoe_rec.models.train_module import StepOutput, TrainModule
    from supermoe_rec.modules.adapters import encode_jagged, jagged_to_padded
    from supermoe_rec.modules.causal import CausalEncoderOutput, CausalMoEEncoder
    from supermoe_rec.modules.embeddings import SparseArch
    from supermoe_rec.modules.gating import TopKRouter
    from supermoe_rec.modules.moe import MoELayer, MoEOutput
    from supermoe_rec.modules.towers import MultiTaskTowers, TaskTower
    from supermoe_rec.modules.transformer import EncoderOutput, MoETransformerEncoder
    from supermoe_rec.objectives.task_indicator import LossOutput, TaskIndicatorLoss


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access and cache it on the package (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        # AttributeError (not ImportError) lets ``from supermoe_rec import <submodule>`` fall back to the import.
        raise AttributeError(f"module 'supermoe_rec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
