"""Data: packaged and local corpora, partitioning into clients, tokenization.

Nothing here downloads: the packaged corpus is the ``chatterbot-corpus`` wheel,
local files are read with ``datasets`` from disk.
"""

from fedge.data.corpora import DataError, load_records
from fedge.data.partition import FederatedData, federated_split, partition, split_holdout

__all__ = [
    "DataError",
    "FederatedData",
    "federated_split",
    "load_records",
    "partition",
    "split_holdout",
]
