"""Item features: extraction by an encoder, the Parquet + FAISS store, feature-set names."""
