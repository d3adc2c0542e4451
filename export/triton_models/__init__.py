"""Python-backend model files copied into the Triton model repository by export/repository.py."""
