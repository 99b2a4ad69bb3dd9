"""Training jobs: the trainer, checkpoints, metrics, the run directory, resume policy, memory release and the torchx
component."""
