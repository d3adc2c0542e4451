"""The contract every room shares: names, tensor specs, labels, encoder configs."""
