"""Test-wide settings: offline hubs (timm-based metrics otherwise retry a dead network for ~50 s), quiet torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
