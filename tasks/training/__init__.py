"""Training: the one loop (loop.py) with its checkpoints, logs and torchrun job (checkpoints.py, logs.py,
distributed.py), its optimisers (optim.py), starting weights (weights.py) and run configs (runconfig.py)."""
