"""Dataset loading: relative image paths, every format, and bad rows stopped with their row number."""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

from examples.demo import make_dataset
from tests.utils import cache_as_hub
from trainer_client.data import DatasetError, load_datasets, load_train_dataset


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
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert row["solution"] in {"red", "green", "blue", "yellow"}
    assert ds["dataset_row"] == [1, 2, 3, 4, 5, 6]


def test_mpo_rows_become_conversations(tmp_path):
    ds = load_train_dataset(make_dataset(tmp_path, 3, seed=1, method="mpo"), "mpo")
    assert ds[0]["chosen"][0]["role"] == "assistant" and isinstance(ds[0]["image"], Image.Image)


def test_json_parquet_and_saved_dataset(image_dir):
    rows = [{"prompt": "colour?", "images": ["img/a.png", "img/b.png"], "solution": "red"}]
    (image_dir / "d.json").write_text(json.dumps(rows))
    assert len(load_train_dataset(image_dir / "d.json", "grpo")[0]["images"]) == 2
    datasets.Dataset.from_list(rows).to_parquet(str(image_dir / "d.parquet"))
    assert len(load_train_dataset(image_dir / "d.parquet", "grpo")[0]["images"]) == 2
    saved = datasets.Dataset.from_list([{"prompt": "colour?", "image": Image.new("RGB", (8, 8)), "solution": "red"}])
    saved = saved.cast_column("image", datasets.Image())
    saved.save_to_disk(str(image_dir / "saved"))
    assert load_train_dataset(image_dir / "saved", "grpo")[0]["image"].size == (8, 8)


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


# ---- lazy images ------------------------------------------------------------------------------------

def test_images_stay_encoded_until_a_row_is_read(image_dir):
    rows = [{"prompt": "p", "image": f"img/{n}.png", "solution": "red"} for n in ("a", "b")]
    ds = load_train_dataset(write_jsonl(image_dir / "d.jsonl", rows), "grpo")
    assert ds.with_format("arrow")[:2].column("image").to_pylist()[1]["path"] == str(image_dir / "img" / "b.png")
    (image_dir / "img" / "b.png").unlink()
    assert ds[0]["image"].size == (32, 32)  # row 1 still decodes: nothing was decoded at load time
    with pytest.raises(FileNotFoundError):
        ds[1]


def test_a_truncated_image_names_the_row(image_dir):
    data = (image_dir / "img" / "a.png").read_bytes()
    (image_dir / "img" / "broken.png").write_bytes(data[: len(data) // 2])
    path = write_jsonl(image_dir / "d.jsonl", [{"prompt": "p", "image": "img/a.png"},
                                                {"prompt": "p", "image": "img/broken.png"}])
    with pytest.raises(DatasetError, match=r"row 2: image .*broken.png cannot be read"):
        load_train_dataset(path, "grpo")


# ---- --dataset_name: a local datasets folder, a hub cache offline ----------------------------------

def colour_parquet_folder(root, n=6, extra=None):
    """A dataset repo as on the hub: data/{train,test}-*.parquet, common VLM column names, image bytes."""
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image(), **(extra or {})})
    (root / "data").mkdir(parents=True)
    for split, count in (("train", n), ("test", 2)):
        rows = [{"problem": f"What colour is shape {i}?", "answer": "red",
                 "image": Image.new("RGB", (16 + i, 16), (200, 0, 0))} for i in range(count)]
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def args(**kw):
    base = dict(dataset=None, dataset_name=None, dataset_config=None, dataset_train_split="train",
                dataset_test_split="test", system_prompt=None, eval_dataset=None)
    return SimpleNamespace(**{**base, **kw})


def test_dataset_name_folder_maps_columns_and_splits(tmp_path):
    folder = colour_parquet_folder(tmp_path / "colours")
    train, test = load_datasets(args(dataset_name=str(folder), system_prompt="Answer in one word."), "grpo")
    assert (train.num_rows, test.num_rows) == (6, 2)
    row = train[3]
    assert row["prompt"] == [{"role": "system", "content": "Answer in one word."},
                             {"role": "user", "content": "What colour is shape 3?"}]
    assert row["solution"] == "red" and row["image"].size == (19, 16) and row["dataset_row"] == 4
    # the images are the memory-mapped Arrow file's, not a copy in memory
    assert train.with_format("arrow")[:1].column("image").to_pylist()[0]["bytes"][:4] == b"\x89PNG"
    train, test = load_datasets(args(dataset_name=str(folder), dataset_test_split="dev"), "grpo")
    assert test is None
    with pytest.raises(DatasetError, match=r"no split 'training' \(has train, test\)"):
        load_datasets(args(dataset_name=str(folder), dataset_train_split="training"), "grpo")


def test_dataset_name_bad_image_bytes_name_the_split_and_row(tmp_path):
    folder = colour_parquet_folder(tmp_path / "colours")
    table = datasets.load_dataset(str(folder))["train"]
    rows = table.cast_column("image", datasets.Image(decode=False)).to_list()
    rows[4]["image"] = {"bytes": b"\x89PNG not really", "path": None}
    for f in (folder / "data").glob("train-*"):
        f.unlink()
    datasets.Dataset.from_list(rows, features=table.features).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DatasetError, match=r"colours \[train\] row 5: image \(embedded bytes\) cannot be read"):
        load_datasets(args(dataset_name=str(folder)), "grpo")


def _offline_script(hf_home, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_dataset_name_from_the_hub_cache_offline(tmp_path):
    folder = colour_parquet_folder(tmp_path / "src")
    cache_as_hub(folder, tmp_path / "hf", "org/colours", "dataset")
    run = _offline_script(tmp_path / "hf", textwrap.dedent("""
        from types import SimpleNamespace
        from trainer_client.data import load_datasets
        a = SimpleNamespace(dataset=None, dataset_name="org/colours", dataset_config=None,
                            dataset_train_split="train", dataset_test_split="test", system_prompt=None,
                            eval_dataset=None)
        train, test = load_datasets(a, "grpo")
        print(train.num_rows, test.num_rows, train[0]["image"].size, train[0]["prompt"][0]["content"])
    """))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "6 2 (16, 16) What colour is shape 0?"
    missing = _offline_script(tmp_path / "hf", textwrap.dedent("""
        from types import SimpleNamespace
        from trainer_client.data import load_datasets
        a = SimpleNamespace(dataset=None, dataset_name="org/nope", dataset_config=None,
                            dataset_train_split="train", dataset_test_split="test", system_prompt=None,
                            eval_dataset=None)
        load_datasets(a, "grpo")
    """))
    assert missing.returncode != 0
    assert "dataset 'org/nope' is not a local folder and not in the Hugging Face cache" in missing.stderr
    assert str(tmp_path / "hf" / "hub") in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr


def test_mpo_from_a_named_folder_ignores_extra_columns(tmp_path):
    root = tmp_path / "prefs"
    (root / "data").mkdir(parents=True)
    rows = [{"question": "colour?", "chosen": " red", "rejected": " blue", "id": i,
             "images": [Image.new("RGB", (16, 16))]} for i in range(3)]
    features = datasets.Features({"question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "id": datasets.Value("int64"),
                                  "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    train, test = load_datasets(args(dataset_name=str(root)), "mpo")
    assert test is None and set(train.column_names) == {"prompt", "chosen", "rejected", "images"}
    assert train[2]["rejected"] == [{"role": "assistant", "content": " blue"}]
    assert train[2]["images"][0].size == (16, 16)


def test_align_train_mpo_from_a_dataset_folder(tiny_vlm, tmp_path):
    from trainer_client.cli import run

    root = tmp_path / "prefs"
    (root / "data").mkdir(parents=True)
    features = datasets.Features({"question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "image": datasets.Image()})
    for split in ("train", "test"):
        rows = [{"question": "What colour is the shape?", "chosen": " red", "rejected": " blue",
                 "image": Image.new("RGB", (64, 64), (200, 0, 0))} for _ in range(4)]
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    trainer = run(["mpo", "--model", str(tiny_vlm), "--dataset_name", str(root), "--output_dir", str(tmp_path / "out"),
                   "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--max_steps", "2",
                   "--eval_strategy", "steps", "--eval_steps", "2", "--report_to", "none", "--disable_tqdm", "true"])
    assert trainer.state.global_step == 2
    assert any("eval_loss" in e for e in trainer.state.log_history)  # the test split was evaluated


def test_no_dataset_flag_is_refused():
    from trainer_client.config import parse_args

    with pytest.raises(SystemExit, match=r"--dataset FILE or --dataset_name"):
        parse_args(["grpo", "--model", "m"])
    with pytest.raises(SystemExit, match=r"one of them"):
        parse_args(["grpo", "--model", "m", "--dataset", "d.jsonl", "--dataset_name", "org/d"])
