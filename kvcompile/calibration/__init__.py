"""Calibration: plans from a model and real text (static channel ranking, LeanK learning, SVD head
merges), the recipes that describe them, and the learned importance they record."""
