"""Distributed training: table sharding (:mod:`~supermoe_rec.distributed.sharding`: planner constraints, sparse
optimizer, building and sharding the train module with DMP) and expert parallelism
(:mod:`~supermoe_rec.distributed.expert_parallel`, applied to a built model by ``parallelize_experts``)."""
