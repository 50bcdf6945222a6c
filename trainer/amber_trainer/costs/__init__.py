"""What a recipe costs, from shapes alone: model sizes, per-GPU memory, GPU-hours."""
