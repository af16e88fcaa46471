"""Load a bundle and run it without PyTorch."""
