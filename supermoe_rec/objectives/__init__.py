"""Training objectives: the task-indicator loss of the towers (:mod:`~supermoe_rec.objectives.task_indicator`), the
next-items loss of the universal vector (:mod:`~supermoe_rec.objectives.next_items`) and the one next-item ranking
convention of evaluation and serving (:mod:`~supermoe_rec.objectives.ranking`)."""
