"""Records from a Hugging Face dataset (`name:split`): a hub id, a local dataset folder, or a `save_to_disk` folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llmbox.errors import DataError
from llmbox_engine.data.readers import RawRecord
from llmbox_engine.data.sources import HubSource


def read_hub_records(source: HubSource) -> Iterator[RawRecord]:
    import datasets  # heavy: imported only when a dataset name is given

    try:
        local = Path(source.name).expanduser()
        if (local / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(local))[source.split]
        elif (local / "dataset_info.json").is_file() and (local / "state.json").is_file():
            dataset = datasets.load_from_disk(str(local))
        else:
            dataset = datasets.load_dataset(source.name, split=source.split)
    except KeyError:
        raise DataError(str(source), f"the dataset has no split {source.split!r}") from None
    except Exception as exc:  # datasets raises many types: missing repo, no network, bad split
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(str(source), f"cannot load the dataset: {message}") from None
    if len(dataset) == 0:
        raise DataError(str(source), "the dataset split is empty")
    for i, row in enumerate(dataset, start=1):
        yield RawRecord(i, None, {k: v for k, v in row.items() if v is not None})
