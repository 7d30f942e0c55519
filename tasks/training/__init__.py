"""Training: the one loop, its optimisers, checkpoint weights and run configs."""
