"""Evaluation: perplexity (and other metrics added alongside)."""
