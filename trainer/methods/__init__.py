"""Training methods, each registered by name in METHODS."""
