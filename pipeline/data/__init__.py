"""Datasets from source to contract: sources, download, preprocessing, the demo, Parquet schemas."""
