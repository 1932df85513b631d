"""Where the files an entry point launches are, in a checkout (editable install) and in an installed package."""

from __future__ import annotations

import importlib.util
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The repository root in a checkout or an editable install; site-packages in a regular install.
CHECKOUT_DIR = os.path.dirname(PACKAGE_DIR)


def train_script() -> str:
    """train_dft.py, the training entry (a top-level module of the distribution, beside the package)."""
    spec = importlib.util.find_spec("train_dft")
    if spec is not None and spec.origin:
        return spec.origin
    return os.path.join(CHECKOUT_DIR, "train_dft.py")


def checkout_file(*parts: str) -> str | None:
    """A file of the repository checkout (scripts/train.sh, assets/...), or None in an installed package."""
    path = os.path.join(CHECKOUT_DIR, *parts)
    return path if os.path.exists(path) else None
