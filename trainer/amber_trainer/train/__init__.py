"""Training: the loop, the objectives, checkpoints and optimizer moments, on-policy rollouts,
precomputed teacher targets, and what makes a GPU step fast."""
