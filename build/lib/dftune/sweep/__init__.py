"""Compare sweeps: every variant x seed launched with the same data, budget and evaluation, and their table."""
