"""Training: data loading, collators and the training loop."""
