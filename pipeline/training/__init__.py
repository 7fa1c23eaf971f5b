"""Training recommenders: the trainer, sampling, evaluation, baselines, end to end, top-k."""
