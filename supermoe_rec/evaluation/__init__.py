"""Evaluation of trained runs: exported user vectors, probes, the universality protocol, next-item retrieval, plots."""
