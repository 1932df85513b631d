"""DFTTrainer: a `transformers.Trainer` whose loss is the DFT family and whose logs carry its metrics.

This is an entry point for readers; the class lives in dftune/trainer.py and the loss it calls in
dftune/loss/ (core.py: the definition; chunked.py: the memory-efficient LM head; variants.py: the table).

    from dft_trainer import DFTTrainer          # from a checkout
    from dftune.trainer import DFTTrainer       # from an installed package
"""

from dftune.trainer import DFTTrainer, count_supervised_tokens, tied_copies

__all__ = ["DFTTrainer", "count_supervised_tokens", "tied_copies"]
