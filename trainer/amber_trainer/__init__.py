"""Amber trainer: the compression stages, run under torchrun with DeepSpeed."""
