"""supermoe_rec: universal user representations with a sparse MoE transformer and multi-task towers on TorchRec."""

__version__ = "0.1.0"
