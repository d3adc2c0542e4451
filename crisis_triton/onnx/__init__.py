"""ONNX export of each graph and its verification against PyTorch."""
