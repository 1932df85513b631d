"""Console scripts (pyproject.toml): dft-eval, dft-compare, dft-inspect; dft-train is train_dft.py at the root."""
