"""Amber: compress MMDiT text-to-image transformers, on Kubernetes or on one machine."""

__version__ = "0.1.0"
