"""The taskfold command line."""
