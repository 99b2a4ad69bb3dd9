"""Configuration: the strict loader (:mod:`~supermoe_rec.config.base`), task descriptions
(:mod:`~supermoe_rec.config.tasks`), the run config (:mod:`~supermoe_rec.config.experiment`) and the ``--help``
listing generated from it (:mod:`~supermoe_rec.config.help`)."""
