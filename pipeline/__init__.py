"""lmmrec's library: data formats, the demo world, encoders, feature store, recommenders,
training, evaluation and statistics. Knows nothing of params.yaml or DVC."""
