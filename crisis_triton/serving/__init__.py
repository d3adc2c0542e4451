"""Serving: the embedded tritonserver, its front, /dev/shm sizing, self-healing."""
