"""Amber operator: reconciles AmberCompression resources into stage Jobs."""
