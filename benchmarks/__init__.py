"""gifjax benchmark scripts (speed and accuracy); results land in benchmarks/results/."""
