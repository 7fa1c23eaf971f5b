"""Test-wide settings: offline, single-threaded where it matters, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ["LMMREC_WARM"] = "0"  # `lmmrec` processes start cold; tests/test_warm.py turns it on
