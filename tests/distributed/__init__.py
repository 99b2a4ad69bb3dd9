"""Tests of supermoe_rec.distributed (real multi-process gloo)."""
