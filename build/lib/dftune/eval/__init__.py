"""Evaluation: answer matchers, generation evaluation, and the hooks DFTTrainer.evaluate runs."""
