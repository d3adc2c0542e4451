"""What the served python models run: graph runtimes, CPU counts, the model files."""
