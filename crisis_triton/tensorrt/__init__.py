"""TensorRT engines and their profiles (GPU machines)."""
