"""Distributed training: the process group every job joins (:mod:`~supermoe_rec.distributed.process_group`), table
sharding (:mod:`~supermoe_rec.distributed.sharding`: planner constraints, sparse optimizer, building and sharding the
train module with DMP), expert parallelism (:mod:`~supermoe_rec.distributed.expert_parallel`, applied to a built
model by ``parallelize_experts``) and planning at cluster scale (:mod:`~supermoe_rec.distributed.planner`)."""
