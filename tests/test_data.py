"""Dataset loading: relative image paths, every format, and bad rows stopped with their row number."""

import json

import datasets
import pytest
from PIL import Image

from trainer_client.data import DatasetError, load_train_dataset
from trainer_client.demo import make_dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "img" / f"{name}.png")
    return tmp_path


def test_grpo_jsonl_with_relative_images(tmp_path):
    path = make_dataset(tmp_path / "data", 6, seed=0)
    ds = load_train_dataset(path, "grpo")
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": "What colour is the shape? Answer with one word."}]
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].size == (64, 64)
    assert row["solution"] in {"red", "green", "blue", "yellow"}
    assert ds["dataset_row"] == [1, 2, 3, 4, 5, 6]


def test_mpo_rows_become_conversations(tmp_path):
    ds = load_train_dataset(make_dataset(tmp_path, 3, seed=1, method="mpo"), "mpo")
    assert ds[0]["chosen"][0]["role"] == "assistant" and len(ds[0]["images"]) == 1


def test_json_parquet_and_saved_dataset(image_dir):
    rows = [{"prompt": "colour?", "images": ["img/a.png", "img/b.png"], "solution": "red"}]
    (image_dir / "d.json").write_text(json.dumps(rows))
    assert len(load_train_dataset(image_dir / "d.json", "grpo")[0]["images"]) == 2
    datasets.Dataset.from_list(rows).to_parquet(str(image_dir / "d.parquet"))
    assert len(load_train_dataset(image_dir / "d.parquet", "grpo")[0]["images"]) == 2
    saved = datasets.Dataset.from_list([{"prompt": "colour?", "image": Image.new("RGB", (8, 8)), "solution": "red"}])
    saved = saved.cast_column("image", datasets.Image())
    saved.save_to_disk(str(image_dir / "saved"))
    assert load_train_dataset(image_dir / "saved", "grpo")[0]["images"][0].size == (8, 8)


def test_missing_image_names_the_row(image_dir):
    path = write_jsonl(image_dir / "d.jsonl", [{"prompt": "p", "image": "img/a.png"},
                                                {"prompt": "p", "image": "img/nope.png"}])
    with pytest.raises(DatasetError, match=r"row 2: image file .*nope.png does not exist"):
        load_train_dataset(path, "grpo")


def test_unknown_column_names_the_row(image_dir):
    path = write_jsonl(image_dir / "d.jsonl", [{"prompt": "p", "image": "img/a.png"},
                                                {"prompt": "p", "imgae": "img/a.png"}])
    with pytest.raises(DatasetError, match=r"row 2: unknown column\(s\) image, imgae"):
        load_train_dataset(path, "grpo")
    path = write_jsonl(image_dir / "m.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}])
    with pytest.raises(DatasetError, match=r"row 1: unknown column\(s\) score"):
        load_train_dataset(path, "mpo")


def test_missing_required_column_and_placeholder_mismatch(image_dir):
    path = write_jsonl(image_dir / "m.jsonl", [{"prompt": "p", "chosen": "a", "image": "img/a.png"}])
    with pytest.raises(DatasetError, match=r"row 1: missing column `rejected`"):
        load_train_dataset(path, "mpo")
    two_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    path = write_jsonl(image_dir / "g.jsonl", [{"prompt": two_parts, "image": "img/a.png"}])
    with pytest.raises(DatasetError, match=r"row 1: the prompt has 2 image part\(s\) but the row gives 1"):
        load_train_dataset(path, "grpo")
