"""Serving: run the embedded tritonserver (nvidia-pytriton) on a model repository."""
