"""Writing a Triton model repository: configs, files, versions, atomic publishing."""
