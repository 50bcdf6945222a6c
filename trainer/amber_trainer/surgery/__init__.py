"""Model surgery, model -> model: layer importance, depth pruning with re-initialisation,
hybrid-stream fusion, and the closed-form refits both use."""
