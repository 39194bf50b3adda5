"""Data loaders for the training tasks."""
