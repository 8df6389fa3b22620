"""Evaluation: retrieval tasks, perplexity and agreement of plans against the dense model, on real text."""
