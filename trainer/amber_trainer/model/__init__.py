"""The models: loading and building them, the forward pass pinned to diffusers, the
hybrid-stream class, and sampling images from them."""
