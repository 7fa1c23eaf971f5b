"""lmmrec's library, one package per phase of the DAG: core, data, encoders, features,
recommenders, training, report, each importing only those before it. Knows nothing of
params.yaml or DVC."""
