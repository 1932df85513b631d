"""What a run leaves and how it runs: checkpoints, distributed set-up, logs, run records, trackers, plots."""
