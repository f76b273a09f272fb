"""Split records into a global held-out set and one partition per client.

Order (fixed, seeded, identical on every node that runs it):
    1. global held-out  = the source's official test split (packaged Reuters) or
       ``data.test_source`` when there is one, else ``global_holdout_fraction`` of
       all records (server side)
    2. the rest is partitioned with a flwr-datasets partitioner:
       natural (one client per value of a column), IID, or Dirichlet(α) over labels
    3. each partition keeps ``holdout_fraction`` as its local held-out set.
Partitions are disjoint and, with the global held-out set, cover every record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedge.data.corpora import DataError, load_records, load_test_records


class LazyList(Sequence):
    """``fn(i)`` for i < n, computed on first access and kept: with 10,000 virtual
    clients a process only pays for the partitions it actually serves."""

    def __init__(self, n: int, fn: Callable[[int], object]):
        self._n, self._fn, self._cache = n, fn, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        i %= self._n
        if i not in self._cache:
            self._cache[i] = self._fn(i)
        return self._cache[i]


def split_holdout(ds, fraction: float, seed: int):
    """(train, held-out) with ``ceil``-free sizes; a 1-record dataset keeps it for training."""
    n = len(ds)
    k = int(round(n * fraction))
    if n < 2 or k == 0:
        return ds, ds.select([])
    k = min(k, n - 1)
    parts = ds.train_test_split(test_size=k, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def partition(
    ds,
    *,
    scheme: str,
    num_partitions: int,
    partition_by: str = "category",
    natural_ids: tuple[str, ...] | None = None,
    alpha: float = 0.3,
    min_partition_size: int = 4,
    seed: int = 0,
) -> list:
    """``num_partitions`` disjoint datasets (flwr-datasets partitioners, no hub), loaded lazily."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if scheme == "natural":
        if partition_by not in ds.column_names:
            raise DataError(f"data.partition_by: column {partition_by!r} not in {ds.column_names}")
        counts: dict[str, int] = {}
        for v in ds[partition_by]:
            counts[str(v)] = counts.get(str(v), 0) + 1
        if natural_ids is None:
            # The largest groups, ties broken by name, so the choice is stable.
            natural_ids = tuple(sorted(counts, key=lambda v: (-counts[v], v))[:num_partitions])
        unknown = [v for v in natural_ids if v not in counts]
        if unknown:
            raise DataError(f"data.natural_ids: {unknown} not found in column {partition_by!r}; "
                            f"available: {sorted(counts)}")
        if len(natural_ids) < num_partitions:
            raise DataError(f"data.num_clients is {num_partitions} but column {partition_by!r} "
                            f"has only {len(natural_ids)} distinct values: {sorted(counts)}")
        wanted = set(natural_ids)
        sub = ds.filter(lambda r: str(r[partition_by]) in wanted)
        sub = sub.map(lambda r: {partition_by: str(r[partition_by])})
        p = NaturalIdPartitioner(partition_by=partition_by)
        p.dataset = sub
        _ = p.num_partitions  # builds the id mapping
        index = {nid: pid for pid, nid in p.partition_id_to_natural_id.items()}
        return LazyList(len(natural_ids), lambda i: p.load_partition(index[natural_ids[i]]))
    if scheme == "iid":
        if len(ds) < num_partitions:
            raise DataError(f"data.num_clients ({num_partitions}) exceeds the {len(ds)} records")
        p = IidPartitioner(num_partitions=num_partitions)
        p.dataset = ds.shuffle(seed=seed)
        return LazyList(num_partitions, p.load_partition)
    if scheme == "dirichlet":
        if partition_by not in ds.column_names:
            raise DataError(f"data.partition_by: column {partition_by!r} not in {ds.column_names}")
        if len(ds) < num_partitions * min_partition_size:
            raise DataError(f"{len(ds)} records cannot give {num_partitions} clients at least "
                            f"{min_partition_size} each (data.min_partition_size)")
        p = DirichletPartitioner(num_partitions=num_partitions, partition_by=partition_by, alpha=alpha,
                                 min_partition_size=min_partition_size, self_balancing=True, seed=seed)
        p.dataset = ds
        return LazyList(num_partitions, p.load_partition)
    raise DataError(f"data.partition: unknown scheme {scheme!r}; allowed: ['natural', 'iid', 'dirichlet']")


@dataclass(frozen=True)
class FederatedData:
    """All splits of one scenario: per-client (train, held-out) and the global held-out."""

    clients: Sequence  # [(train Dataset, held-out Dataset), ...], split on first access
    global_holdout: object
    label_names: tuple[str, ...] | None
    client_names: tuple[str, ...]


@lru_cache(maxsize=4)
def federated_split(
    *,
    source: str,
    task: str,
    languages: tuple[str, ...],
    scheme: str,
    num_clients: int,
    partition_by: str,
    natural_ids: tuple[str, ...] | None,
    alpha: float,
    min_partition_size: int,
    holdout_fraction: float,
    global_holdout_fraction: float,
    seed: int,
    test_source: str | None = None,
) -> FederatedData:
    """Deterministic split shared by server and clients (cached per process)."""
    ds, label_names = load_records(source, task=task, languages=languages)
    if len(ds) == 0:
        raise DataError(f"data.source {source!r} holds no records")
    test = load_test_records(source, task=task, test_source=test_source, label_names=label_names)
    if test is not None:  # an official or operator-given test set: every training record goes to clients
        rest, global_holdout = ds.shuffle(seed=seed), test
    else:
        rest, global_holdout = split_holdout(ds, global_holdout_fraction, seed)
    parts = partition(rest, scheme=scheme, num_partitions=num_clients, partition_by=partition_by,
                      natural_ids=natural_ids, alpha=alpha, min_partition_size=min_partition_size, seed=seed)
    clients = LazyList(len(parts), lambda i: split_holdout(parts[i], holdout_fraction, seed + 1 + i))
    if scheme == "natural":
        names = tuple(str(p[0][partition_by]) if len(p) else f"client-{i}" for i, p in enumerate(parts))
    else:
        names = tuple(f"client-{i}" for i in range(num_clients))
    return FederatedData(clients=clients, global_holdout=global_holdout,
                         label_names=tuple(label_names) if label_names else None, client_names=names)


def data_args(cfg) -> dict:
    """Flat arguments of :func:`federated_split` from a scenario (server and clients agree)."""
    d = cfg.data
    return dict(source=d.source, task=cfg.model.task, languages=tuple(d.languages), scheme=d.partition,
                num_clients=d.num_clients, partition_by=d.partition_by,
                natural_ids=tuple(d.natural_ids) if d.natural_ids else None, alpha=d.alpha,
                min_partition_size=d.min_partition_size, holdout_fraction=d.holdout_fraction,
                global_holdout_fraction=d.global_holdout_fraction, seed=cfg.seed, test_source=d.test_source)


def num_labels(cfg) -> int | None:
    """Classes of a classification scenario: ``model.num_labels``, else from the data."""
    if cfg.model.task != "sequence-classification":
        return None
    if cfg.model.num_labels:
        return cfg.model.num_labels
    return len(federated_split(**data_args(cfg)).label_names or ()) or None
