"""Data stage: datasets, the task split, the tokenizer and training batches."""
