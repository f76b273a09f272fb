"""fedge: federated LoRA fine-tuning of small language models on edge devices."""

import os as _os

# Quiet, offline-friendly defaults for the libraries we drive (users can override).
for _k, _v in {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "TQDM_DISABLE": "1",
}.items():
    _os.environ.setdefault(_k, _v)

__version__ = "0.1.0"
