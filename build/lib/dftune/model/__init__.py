"""Loading the tokenizer and model, and LoRA."""
