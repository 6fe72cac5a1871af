"""Datasets of the two shipped tasks: the JSONL files next to this module, read with HF `datasets` (no hub).

lm-eval calls these through `custom_dataset: !function shakespeare_tasks.<name>` in the task YAML, so the files are
found wherever the folder is (a `dataset_kwargs.data_files` path would be read from the current folder).
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _test_split(file_name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / file_name),
                                                               split="train")})


def next_line(**kwargs) -> datasets.DatasetDict:
    return _test_split("shakespeare_next_line.jsonl")


def perplexity(**kwargs) -> datasets.DatasetDict:
    return _test_split("shakespeare_ppl.jsonl")
