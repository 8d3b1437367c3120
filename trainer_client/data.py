"""Datasets for `align-train`: local jsonl/json/parquet (image paths relative to the file) or a
`datasets` dataset saved with `save_to_disk`, checked row by row before any training starts.

GRPO/GSPO rows: `prompt` (a string or chat messages), `image` or `images`, optional `solution`, plus
any columns custom rewards read. MPO rows: `prompt`, `chosen`, `rejected`, `image` or `images`.
Rows come out as TRL expects them: conversational prompt, PIL images, and a `dataset_row` column
(the 1-based row number) that reward errors quote.
"""

import json
from pathlib import Path

from PIL import Image

GRPO_COLUMNS = {"prompt", "image", "images", "solution"}
MPO_COLUMNS = {"prompt", "chosen", "rejected", "image", "images"}


class DatasetError(ValueError):
    """A row the trainer cannot use; the message names the file and the row."""


def _read_rows(path: Path) -> list[dict]:
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DatasetError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(ds)})")
            ds = ds["train"]
        return [dict(r) for r in ds]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DatasetError(f"{path} row {i}: not valid JSON ({exc})") from exc
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json dataset must be a list of rows")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DatasetError(f"{path}: unsupported dataset; give .jsonl, .json, .parquet or a save_to_disk directory")


def _open_image(value, root: Path, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # datasets' Image() storage
        import io

        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        return Image.open(src).convert("RGB")
    if not isinstance(value, str):
        raise DatasetError(f"{where}: an image must be a file path, got {type(value).__name__}")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise DatasetError(f"{where}: image file {path} cannot be read ({exc})") from exc


def _messages(value, role: str, where: str, column: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DatasetError(f"{where}: `{column}` must be a string or a list of chat messages")


def _image_parts(messages: list[dict]) -> int | None:
    """Image placeholders written in the messages; None when every content is plain text (TRL adds them)."""
    if all(isinstance(m.get("content"), str) for m in messages):
        return None
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") == "image")


def load_rows(path: str | Path, method: str) -> list[dict]:
    """Read and check every row; raises DatasetError naming the first bad row."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    root = path if path.is_dir() else path.parent
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    known, required = (MPO_COLUMNS, ("prompt", "chosen", "rejected")) if method == "mpo" else (GRPO_COLUMNS, ("prompt",))
    first_keys = set(rows[0])
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: a row must be an object with named columns")
        for column in required:
            if row.get(column) is None:
                raise DatasetError(f"{where}: missing column `{column}`")
        extra = set(row) - known
        # MPO has a fixed schema. GRPO rows may carry columns for custom rewards, but every row the same ones.
        unknown = extra if method == "mpo" else set(row) ^ first_keys
        if unknown:
            raise DatasetError(f"{where}: unknown column(s) {', '.join(sorted(unknown))}; "
                               f"{'expected ' + ', '.join(sorted(known)) if method == 'mpo' else 'row 1 has ' + ', '.join(sorted(first_keys))}")
        if "image" in row and "images" in row:
            raise DatasetError(f"{where}: give `image` or `images`, not both")
        values = row.get("images", [row["image"]] if row.get("image") is not None else [])
        if not isinstance(values, list):
            raise DatasetError(f"{where}: `images` must be a list of image paths")
        images = [_open_image(v, root, where) for v in values]
        item = {k: v for k, v in row.items() if k not in ("image", "images")}
        item["prompt"] = _messages(row["prompt"], "user", where, "prompt")
        placeholders = _image_parts(item["prompt"])
        if placeholders is not None and placeholders != len(images):
            raise DatasetError(f"{where}: the prompt has {placeholders} image part(s) but the row gives "
                               f"{len(images)} image(s)")
        if method == "mpo":
            item["chosen"] = _messages(row["chosen"], "assistant", where, "chosen")
            item["rejected"] = _messages(row["rejected"], "assistant", where, "rejected")
            item["images"] = images
        else:
            item["images"] = images
            item["dataset_row"] = i
        out.append(item)
    return out


def load_train_dataset(path: str | Path, method: str):
    """A `datasets.Dataset` in TRL's format, every row checked first."""
    import datasets

    rows = load_rows(path, method)
    features = None
    if any(r["images"] for r in rows):
        # Declared image features keep PIL images as images (and let datasets store them compactly).
        ds = datasets.Dataset.from_list([{**r, "images": []} for r in rows])
        features = ds.features.copy()
        features["images"] = datasets.List(datasets.Image())
    return datasets.Dataset.from_list(rows, features=features)
