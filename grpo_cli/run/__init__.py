"""What a training run keeps: checkpoints and exact resume, guards, the run log and trackers, progress, plots."""
