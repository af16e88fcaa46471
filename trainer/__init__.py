"""Training and search: tasks, datasets, weighting strategies, the search/train skeleton, run directories."""
