"""dftune: fine-tuning causal LMs with the DFT loss family (DFT Trainer).

Sub-packages, one concern each (the package never imports the repository's root entry files):

    dftune.loss     the loss family as pure functions: full logits, chunked LM head, reference model,
                    the variant table, and `compute_loss_func` for a plain transformers/TRL Trainer
    dftune.data     data files and formats, chat templates, supervised spans and encoding, the cached
                    build and its report, collators, packing, tokenizer setup
    dftune.eval     answer matchers, generation evaluation, the trainer's evaluation hooks
    dftune.sweep    compare sweeps: launches, results, plots
    dftune.run      checkpoints and their manifest, distributed set-up, logs, run records, trackers, plots
    dftune.model    loading the tokenizer and model, LoRA
    dftune.cli      the console scripts dft-eval, dft-compare, dft-inspect (dft-train is train_dft.py)

`dftune.arguments` holds the command-line dataclasses; `dftune.trainer` the DFTTrainer.
"""

__version__ = "0.5.0"
