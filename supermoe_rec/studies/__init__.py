"""Studies built on many isolated runs: the executor, the seesaw comparison, ablations and the MoE scaling study."""
