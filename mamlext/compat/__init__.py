"""Compatibility layers that make other meta-learning libraries run on current PyTorch."""
