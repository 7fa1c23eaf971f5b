"""DVC stages of lmmrec: each reads params.yaml, calls `pipeline`, writes its outs atomically."""
