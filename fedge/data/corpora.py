"""Record loaders: the packaged chatterbot corpus and local JSONL/CSV/parquet.

Every loader returns a ``datasets.Dataset`` with the columns a task needs:

* causal-lm: ``prompt``, ``response`` (+ ``category``, ``language`` or ``client``)
* sequence-classification: ``text``, ``label`` (int) (+ ``language`` / ``client``)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's C parser when present: ~10x faster

CAUSAL_COLUMNS = ("prompt", "response")
CLS_COLUMNS = ("text", "label")


class DataError(ValueError):
    """Data that cannot be used; the message says what is wrong and what is allowed."""


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the packaged corpus needs 'chatterbot-corpus' (pip install chatterbot-corpus)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def chatterbot_languages() -> list[str]:
    return sorted(p.name for p in chatterbot_dir().iterdir() if p.is_dir())


def _conversations(path: Path) -> list[list[str]]:
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER) or {}
    return [c for c in raw.get("conversations", []) if isinstance(c, list)]


def _resolve_languages(languages: tuple[str, ...] | list[str]) -> list[str]:
    available = chatterbot_languages()
    if list(languages) == ["all"]:
        return available
    unknown = sorted(set(languages) - set(available))
    if unknown:
        raise DataError(f"data.languages: unknown {unknown}; available: {available} or ['all']")
    return list(languages)


def chatterbot_pairs(languages: tuple[str, ...] | list[str] = ("english",)) -> list[dict]:
    """(utterance, reply) pairs from every conversation, de-duplicated per category.

    The corpus repeats pairs heavily (tech_support: 1,050 pairs, 10 distinct);
    duplicates would leak between train and held-out splits.
    """
    rows, seen = [], set()
    for lang in _resolve_languages(languages):
        for f in sorted((chatterbot_dir() / lang).glob("*.yml")):
            for conv in _conversations(f):
                for a, b in zip(conv[:-1], conv[1:]):
                    if not (isinstance(a, str) and isinstance(b, str)) or not a.strip() or not b.strip():
                        continue
                    key = (lang, f.stem, a.strip(), b.strip())
                    if key in seen:
                        continue
                    seen.add(key)
                    rows.append({"prompt": a.strip(), "response": b.strip(), "category": f.stem, "language": lang})
    return rows


def chatterbot_utterances(languages: tuple[str, ...] | list[str] = ("all",)) -> tuple[list[dict], list[str]]:
    """Distinct utterances labelled by language (a 28-way language-ID task)."""
    langs = _resolve_languages(languages)
    rows, seen = [], set()
    for i, lang in enumerate(langs):
        for f in sorted((chatterbot_dir() / lang).glob("*.yml")):
            for conv in _conversations(f):
                for u in conv:
                    if isinstance(u, str) and u.strip() and (lang, u.strip()) not in seen:
                        seen.add((lang, u.strip()))
                        rows.append({"text": u.strip(), "label": i, "language": lang, "category": f.stem})
    return rows, langs


def _load_local(path: Path):
    import datasets

    loaders = {".jsonl": datasets.Dataset.from_json, ".json": datasets.Dataset.from_json,
               ".csv": datasets.Dataset.from_csv, ".parquet": datasets.Dataset.from_parquet}
    if path.suffix not in loaders:
        raise DataError(f"data.source: unsupported file type {path.suffix!r}; allowed: {sorted(loaders)}")
    if not path.exists():
        raise DataError(f"data.source: file not found: {path}")
    return loaders[path.suffix](str(path))


def load_records(source: str, *, task: str, languages: tuple[str, ...] | list[str] = ("english",)):
    """Load a corpus as a ``datasets.Dataset``; return ``(dataset, label_names | None)``."""
    import datasets

    if source == "chatterbot":
        if task != "causal-lm":
            raise DataError("data.source 'chatterbot' is a QA corpus for task causal-lm; "
                            "use 'chatterbot-language-id' for sequence-classification")
        return datasets.Dataset.from_list(chatterbot_pairs(languages)), None
    if source == "chatterbot-language-id":
        if task != "sequence-classification":
            raise DataError("data.source 'chatterbot-language-id' needs task sequence-classification")
        rows, names = chatterbot_utterances(languages)
        return datasets.Dataset.from_list(rows), names
    ds = _load_local(Path(source).expanduser())
    need = CAUSAL_COLUMNS if task == "causal-lm" else CLS_COLUMNS
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing columns {missing} for task {task}; found {ds.column_names}")
    if task == "causal-lm":
        return ds, None
    # Labels may be strings; map them to ints in sorted order (stable across clients).
    labels = ds["label"]
    if all(isinstance(x, str) for x in labels):
        names = sorted(set(labels))
        ds = ds.map(lambda r: {"label": names.index(r["label"])})
        return ds, names
    names = [str(i) for i in range(int(max(labels)) + 1)]
    return ds, names
