"""Shared by every phase, importing no other package: atomic writes, registries, seeds, devices."""
