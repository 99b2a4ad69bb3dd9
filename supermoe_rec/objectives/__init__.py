"""Training objectives: the task-indicator loss of the towers (:mod:`~supermoe_rec.objectives.task_indicator`) and the
next-items loss of the universal vector (:mod:`~supermoe_rec.objectives.next_items`)."""
