"""Networks: every forward returns {task: Tensor}."""
