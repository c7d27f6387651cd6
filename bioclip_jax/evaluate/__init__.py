"""Evaluation with the paper's protocols: zero-shot (by text type, per rank), few-shot, the benchmark table."""
