"""Datasets for `align-train`, checked row by row before any training starts, images decoded lazily.

Sources: `--dataset FILE` (jsonl/json/parquet, image paths relative to the file, or a `datasets`
dataset saved with `save_to_disk`), or `--dataset_name` as TRL's scripts take it (a hub id or a local
dataset folder, read by `datasets.load_dataset`; `--dataset_config`, `--dataset_train_split`,
`--dataset_test_split`).

GRPO/GSPO rows: a prompt (`prompt`, `problem` or `question`: a string or chat messages), `image` or
`images`, an optional solution (`solution` or `answer`), plus any columns custom rewards read. MPO
rows: a prompt, `chosen`, `rejected`, `image` or `images`. Rows come out as TRL expects them:
conversational prompt (after `--system_prompt` when given), the image column as datasets `Image`
features, and for GRPO a `dataset_row` column (the 1-based row number) that reward errors quote.

Rows of every method may carry `video` (a file path, mp4/webm/..., or a list of frame image paths) or
`videos` (a list of those), beside or instead of images; paths relative to the file or dataset folder (a
hub dataset's snapshot). They become a `videos` column of absolute paths, each video one list (`[file]`
or its frames), sampled into frames when a batch reads the row (trainer_client/video.py); a prompt
without video parts gets one per video before its text. The check opens each video's container and
stream (or each frame's header): an unreadable one stops the run before training, naming the row.

Images stay encoded (bytes or paths) in the Arrow table and are decoded when a batch reads its rows,
so memory does not grow with the dataset. The start-up check streams over the table, opening each
image's header and verifying its data without decoding pixels.
"""

import io
import json
import logging
from pathlib import Path

import datasets
from PIL import Image

from trainer_client.video import VIDEO_SUFFIXES, VideoBudget, VideoError, is_video_file, probe

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "problem", "question")
SOLUTION_COLUMNS = ("solution", "answer")
IMAGE_COLUMNS = ("image", "images")
VIDEO_COLUMNS = ("video", "videos")
_PROBE = VideoBudget()  # the data check opens each video; the run's budgets sample it later
CHECK_BATCH = 256  # rows whose encoded images are held at once by the start-up check


class DatasetError(ValueError):
    """A row the trainer cannot use; the message names the source and the row."""


def _read_json_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: a .json dataset must be a list of rows")
        return rows
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path} row {i}: not valid JSON ({exc})") from exc
    return rows


def _from_json_rows(path: Path, rows: list[dict], method: str) -> datasets.Dataset:
    """Column-wise, so a prompt that is a string in one row and messages in another stays as given;
    the key set of each row is checked here, before Arrow would fill gaps with nulls."""
    if not rows:
        raise DatasetError(f"{path}: no rows")
    first = rows[0]
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DatasetError(f"{path} row {i}: a row must be an object with named columns")
        # MPO's schema is fixed (checked later); GRPO rows may carry reward columns, but all rows the same.
        if method != "mpo" and set(row) != set(first):
            raise DatasetError(f"{path} row {i}: unknown column(s) {', '.join(sorted(set(row) ^ set(first)))}; "
                               f"row 1 has {', '.join(sorted(first))}")
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    # Conversations (SFT) differ message by message (tool calls; text or parts): one JSON string per row.
    if method == "sft" and "messages" in columns:
        columns["messages"] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in columns["messages"]]
    # A video is a file path or a list of frame paths: one list for all ([file] or the frames), as `_videos` reads.
    if "video" in columns:
        columns["video"] = [[v] if isinstance(v, str) else v for v in columns["video"]]
    if "videos" in columns:
        columns["videos"] = [[[v] if isinstance(v, str) else v for v in vs] if isinstance(vs, list) else vs
                             for vs in columns["videos"]]
    # A string in one row and messages in another cannot share an Arrow column: messages for all.
    prompt_col = next((c for c in PROMPT_COLUMNS if c in columns), "prompt")
    for k, role in [(prompt_col, "user"), ("chosen", "assistant"), ("rejected", "assistant")]:
        if k in columns:
            columns[k] = [_as_messages(v, role, f"{path} row {i}", k) if v is not None else None
                          for i, v in enumerate(columns[k], 1)]
    try:
        return datasets.Dataset.from_dict(columns)
    except (TypeError, ValueError) as exc:  # pyarrow: a column whose rows have different types
        raise DatasetError(f"{path}: columns must hold one type each across rows ({exc})") from exc


def read_file(path: str | Path, method: str) -> datasets.Dataset:
    """The raw rows of a `--dataset` file (or save_to_disk folder) as an Arrow-backed dataset."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: not a dataset saved with save_to_disk; a folder of data files "
                               "(data/train-*.parquet) or a hub id goes to --dataset_name") from exc
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DatasetError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(ds)})")
            ds = ds["train"]
        return ds
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _from_json_rows(path, _read_json_rows(path), method)
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))  # memory-mapped Arrow, not rows in Python
    raise DatasetError(f"{path}: unsupported dataset; give .jsonl, .json, .parquet or a save_to_disk directory")


def load_named(name: str, config: str | None) -> datasets.DatasetDict:
    """`--dataset_name` as TRL's scripts load it, plus what `datasets` does not do offline: a dataset repo
    already in the hub cache (`hf download --repo-type dataset`) is read from there."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return datasets.load_dataset(name, config)
    except ConnectionError:
        # datasets 5.2 offline only finds datasets it loaded before; the hub cache may hold the repo.
        try:
            snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            how = "HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
            raise DatasetError(f"dataset {name!r} is not a local folder and not in the Hugging Face cache "
                               f"{constants.HF_HUB_CACHE}, and {how}; download it first "
                               f"(hf download --repo-type dataset {name})") from None
        return datasets.load_dataset(snapshot, config)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ValueError) as exc:
        raise DatasetError(f"dataset {name!r}: {exc}") from None


def hub_snapshot(name: str) -> Path | None:
    """The hub dataset's folder in the Hugging Face cache, which its rows' relative file paths (videos beside
    the data files, as video datasets ship them) are read from; None when the cache holds no snapshot of it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _as_messages(value, role: str, where: str, column: str) -> list[dict]:
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


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if not system_prompt or messages[0].get("role") == "system":
        return messages
    # Arrow keeps one type per field: the system content takes the form the other messages use.
    content = system_prompt if isinstance(messages[0].get("content"), str) else [{"type": "text", "text": system_prompt}]
    return [{"role": "system", "content": content}, *messages]


def _check_image(value, root: Path, where: str) -> str | None:
    """Opens the image's header and verifies its data (no pixels decoded); returns the absolute path of
    a path-given image, None for bytes."""
    if isinstance(value, dict) and value.get("bytes"):
        src, path = io.BytesIO(value["bytes"]), None
    else:
        name = value.get("path") if isinstance(value, dict) else value
        if not isinstance(name, str):
            raise DatasetError(f"{where}: an image must be a file path or image bytes, got {type(value).__name__}")
        path = Path(name) if Path(name).is_absolute() else root / name
        if not path.is_file():
            raise DatasetError(f"{where}: image file {path} does not exist")
        src = path
    try:
        with Image.open(src) as img:
            img.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError or struct errors for broken files
        shown = f"file {path}" if path else "(embedded bytes)"
        raise DatasetError(f"{where}: image {shown} cannot be read ({type(exc).__name__}: {exc})") from exc
    return None if path is None else str(path)


def _videos(value, column: str, root: Path, where: str) -> list[list[str]]:
    """A row's `video` (one: a file path or a list of frame paths) or `videos` (a list of those) as lists of
    absolute paths, each checked (`video.probe`: container and stream opened, frame headers verified)."""
    if value is None:
        return []
    given = value if column == "videos" else [value]
    if column == "videos" and not isinstance(value, list):
        raise DatasetError(f"{where}: `videos` must be a list of videos (each a file path or a list of frame paths)")
    out = []
    if column == "video" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        given = [value]  # one video: a [file] or its frames
    for video in given:
        entries = [video] if isinstance(video, str) else video
        if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
            raise DatasetError(f"{where}: a video must be a file path or a non-empty list of frame image paths, "
                               f"got {type(video).__name__}")
        entries = [str(Path(e) if Path(e).is_absolute() else root / e) for e in entries]
        if len(entries) == 1 and not is_video_file(entries):
            raise DatasetError(f"{where}: {entries[0]} is not a video file ({', '.join(VIDEO_SUFFIXES)}); "
                               "give frames as a list of image paths")
        try:
            probe(entries, _PROBE, where)
        except VideoError as exc:
            missing = "does not exist" in str(exc) and not Path(str(video if isinstance(video, str) else video[0])).is_absolute()
            hint = (f" (relative paths are read from {root}; a hub dataset's videos come with the whole repo: "
                    "hf download --repo-type dataset NAME)") if missing else ""
            raise DatasetError(f"{exc}{hint}") from None
        out.append(entries)
    return out


def _video_parts(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "video")


def _with_placeholders(messages: list[dict], images: int, videos: int) -> list[dict]:
    """Every content as parts (rows with and without videos share one Arrow type), the first user message's
    text led by one image part per image and one video part per video when the prompt wrote none."""
    out, placed = [], _image_parts(messages) is not None
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            lead = []
            if m["role"] == "user" and not placed:
                lead, placed = [{"type": "image"}] * images + [{"type": "video"}] * videos, True
            content = [*lead, {"type": "text", "text": content}]
        out.append({**m, "content": content})
    return out


def prepare(raw: datasets.Dataset, method: str, source: str, root: Path | None = None,
            system_prompt: str | None = None, strict_columns: bool = True) -> datasets.Dataset:
    """Raw rows -> TRL's format: columns mapped, every row checked in one streaming pass (encoded
    images held a batch at a time), images left encoded in Arrow for lazy decoding."""
    columns = raw.column_names
    if raw.num_rows == 0:
        raise DatasetError(f"{source}: no rows")
    if method == "sft":
        return prepare_sft(raw, source, root, system_prompt)
    prompt_col = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if prompt_col is None:
        raise DatasetError(f"{source}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)} "
                           f"(has {', '.join(columns)})")
    image_cols = [c for c in IMAGE_COLUMNS if c in columns]
    if len(image_cols) > 1:
        raise DatasetError(f"{source} row 1: give `image` or `images`, not both")
    image_col = image_cols[0] if image_cols else None
    video_cols = [c for c in VIDEO_COLUMNS if c in columns]
    if len(video_cols) > 1:
        raise DatasetError(f"{source} row 1: give `video` or `videos`, not both")
    video_col = video_cols[0] if video_cols else None
    if method == "mpo":
        answer_cols = ["chosen", "rejected"]
        for c in answer_cols:
            if c not in columns:
                raise DatasetError(f"{source} row 1: missing column `{c}`")
        extra = [c for c in columns if c not in (prompt_col, *answer_cols, *IMAGE_COLUMNS, *VIDEO_COLUMNS)]
        if extra and strict_columns:
            raise DatasetError(f"{source} row 1: unknown column(s) {', '.join(sorted(extra))}; expected "
                               f"{', '.join(sorted({'prompt', 'chosen', 'rejected', *IMAGE_COLUMNS, *VIDEO_COLUMNS}))}")
        if extra:
            log.info("%s: MPO uses prompt, chosen, rejected, images and videos; ignoring %s", source, ", ".join(extra))
        keep = []
    else:
        solution_col = next((c for c in SOLUTION_COLUMNS if c in columns), None)
        answer_cols = [solution_col] if solution_col else []
        keep = [c for c in columns if c not in (prompt_col, *answer_cols, image_col, video_col, "dataset_row")]

    text_cols = [prompt_col, *answer_cols]
    required = text_cols if method == "mpo" else [prompt_col]
    image_feature = raw.features.get(image_col) if image_col else None
    encoded = isinstance(image_feature, datasets.Image) or (
        isinstance(image_feature, datasets.List) and isinstance(image_feature.feature, datasets.Image))
    out = {"prompt": []} | {c: [] for c in ("chosen", "rejected") if method == "mpo"}
    if method != "mpo" and answer_cols:
        out["solution"] = []
    paths: list = []
    videos: list[list[list[str]]] = []  # per row, its videos (each a file or frame paths)
    # Arrow format: image cells come as {bytes, path} (or path strings) and are never decoded here.
    stream = raw.select_columns(text_cols + ([image_col] if image_col else [])
                                + ([video_col] if video_col else [])).with_format("arrow")
    row = 0
    for batch in stream.iter(batch_size=CHECK_BATCH):
        texts = {c: batch.column(c).to_pylist() for c in text_cols}
        images = batch.column(image_col).to_pylist() if image_col else [None] * batch.num_rows
        clips = batch.column(video_col).to_pylist() if video_col else [None] * batch.num_rows
        for k in range(batch.num_rows):
            row += 1
            where = f"{source} row {row}"
            for c in required:
                if texts[c][k] is None:
                    raise DatasetError(f"{where}: missing column `{c}`")
            value = images[k]
            if image_col == "images" and value is not None and not isinstance(value, list):
                raise DatasetError(f"{where}: `images` must be a list of images")
            values = value if image_col == "images" else ([] if value is None else [value])
            checked = [_check_image(v, root or Path("."), where) for v in values or []]
            if not encoded and image_col:
                # beside videos, every row's images as a list: TRL's processor call takes [] for a row
                # without an image, not None (a batch of video and image rows)
                paths.append(checked if image_col == "images" or video_col else (checked[0] if checked else None))
            prompt = _with_system(_as_messages(texts[prompt_col][k], "user", where, prompt_col), system_prompt)
            placeholders = _image_parts(prompt)
            if placeholders is not None and placeholders != len(checked):
                raise DatasetError(f"{where}: the prompt has {placeholders} image part(s) but the row gives "
                                   f"{len(checked)} image(s)")
            if video_col:
                row_videos = _videos(clips[k], video_col, root or Path("."), where)
                written = _video_parts(prompt)
                if (written or placeholders is not None) and written != len(row_videos):
                    raise DatasetError(f"{where}: the prompt has {written} video part(s) but the row gives "
                                       f"{len(row_videos)} video(s)")
                videos.append(row_videos)
                prompt = _with_placeholders(prompt, len(checked), 0 if written else len(row_videos))
            out["prompt"].append(prompt)
            if method == "mpo":
                out["chosen"].append(_as_messages(texts["chosen"][k], "assistant", where, "chosen"))
                out["rejected"].append(_as_messages(texts["rejected"][k], "assistant", where, "rejected"))
            elif answer_cols:
                value = texts[answer_cols[0]][k]
                out["solution"].append(value if value is None or isinstance(value, str) else str(value))

    parts = [datasets.Dataset.from_dict(out)]
    if image_col and encoded:
        parts.append(raw.select_columns([image_col]))  # still the memory-mapped (or saved) encoded images
    elif image_col:
        listed = image_col == "images" or video_col
        feature = datasets.List(datasets.Image()) if listed else datasets.Image()
        name = "images" if listed else image_col
        parts.append(datasets.Dataset.from_dict({name: paths}, features=datasets.Features({name: feature})))
    elif video_col and method == "mpo":
        # TRL's DPOTrainer collates rows on the fly (where the videos are sampled) only for a dataset with images
        parts.append(datasets.Dataset.from_dict({"images": [[] for _ in videos]},
                                                features=datasets.Features({"images": datasets.List(datasets.Image())})))
    if video_col:
        parts.append(datasets.Dataset.from_dict({"videos": videos}, features=datasets.Features(
            {"videos": datasets.List(datasets.List(datasets.Value("string")))})))
    if keep:
        parts.append(raw.select_columns(keep))
    if method != "mpo":
        parts.append(datasets.Dataset.from_dict({"dataset_row": list(range(1, raw.num_rows + 1))}))
    return datasets.concatenate_datasets(parts, axis=1) if len(parts) > 1 else parts[0]


def _conversation(value, where: str) -> list[dict]:
    messages = json.loads(value) if isinstance(value, str) else value
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages)):
        raise DatasetError(f"{where}: `messages` must be a list of chat messages (each with a role)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant message, so nothing to learn")
    return messages


def prepare_sft(raw: datasets.Dataset, source: str, root: Path | None = None,
                system_prompt: str | None = None) -> datasets.Dataset:
    """SFT rows -> `messages` (one JSON conversation per row, so rows may differ in shape) and `images`.
    A row is a whole conversation (`messages`, with assistant tool calls and tool messages that carry
    images: tool-use traces), or a prompt and its answer: `completion`, `chosen` (an MPO row) or
    `solution`/`answer` (a GRPO row), which becomes the assistant's message."""
    columns = raw.column_names
    answer_cols = ("completion", "chosen", *SOLUTION_COLUMNS)
    prompt_col = next((c for c in PROMPT_COLUMNS if c in columns), None)
    answer_col = next((c for c in answer_cols if c in columns), None)
    if "messages" not in columns and not (prompt_col and answer_col):
        raise DatasetError(f"{source}: SFT needs a `messages` column (whole conversations) or a prompt column "
                           f"({', '.join(PROMPT_COLUMNS)}) with an answer column ({', '.join(answer_cols)}); "
                           f"has {', '.join(columns)}")
    image_cols = [c for c in IMAGE_COLUMNS if c in columns]
    if len(image_cols) > 1:
        raise DatasetError(f"{source} row 1: give `image` or `images`, not both")
    image_col = image_cols[0] if image_cols else None
    video_cols = [c for c in VIDEO_COLUMNS if c in columns]
    if len(video_cols) > 1:
        raise DatasetError(f"{source} row 1: give `video` or `videos`, not both")
    video_col = video_cols[0] if video_cols else None
    out = {"messages": [], "images": []} | ({"videos": []} if video_col else {})
    for row, values in enumerate(raw.select_columns([c for c in columns if c in ("messages", prompt_col, answer_col,
                                                                                image_col, video_col)]), 1):
        where = f"{source} row {row}"
        if "messages" in columns:
            messages = _conversation(values["messages"], where)
        else:
            prompt = _as_messages(values[prompt_col], "user", where, prompt_col)
            answer = values[answer_col]
            messages = prompt + _as_messages(answer if isinstance(answer, list) else str(answer), "assistant",
                                             where, answer_col)
        messages = _with_system(messages, system_prompt)
        images = values[image_col] if image_col else None
        images = images if isinstance(images, list) else ([] if images is None else [images])
        for v in images:
            if not isinstance(v, Image.Image):  # an Image feature's cells come decoded, others as paths or bytes
                _check_image(v, root or Path("."), where)
        placeholders = _image_parts(messages)
        if placeholders is not None and placeholders != len(images):
            raise DatasetError(f"{where}: the conversation has {placeholders} image part(s) but the row gives "
                               f"{len(images)} image(s)")
        if video_col:
            row_videos = _videos(values[video_col], video_col, root or Path("."), where)
            written = _video_parts(messages)
            if placeholders is not None and written != len(row_videos):
                raise DatasetError(f"{where}: the conversation has {written} video part(s) but the row gives "
                                   f"{len(row_videos)} video(s)")
            out["videos"].append(row_videos)
        out["messages"].append(json.dumps(messages))
        out["images"].append([_absolute(v, root) for v in images])
    features = datasets.Features({"messages": datasets.Value("string"), "images": datasets.List(datasets.Image())}
                                 | ({"videos": datasets.List(datasets.List(datasets.Value("string")))} if video_col else {}))
    return datasets.Dataset.from_dict(out, features=features)


def _absolute(value, root: Path | None):
    if isinstance(value, str) and not Path(value).is_absolute():
        return str((root or Path(".")) / value)
    return value


def load_train_dataset(path: str | Path, method: str, system_prompt: str | None = None) -> datasets.Dataset:
    """A `--dataset` file as a checked `datasets.Dataset` in TRL's format."""
    path = Path(path)
    raw = read_file(path, method)
    return prepare(raw, method, str(path), path if path.is_dir() else path.parent, system_prompt)


def load_datasets(align, method: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) from the run's arguments; eval is `--eval_dataset FILE` when given, else the
    `--dataset_test_split` when the named dataset has one, else None."""
    eval_set = (load_train_dataset(align.eval_dataset, method, align.system_prompt)
                 if align.eval_dataset else None)
    if align.dataset:
        return load_train_dataset(align.dataset, method, align.system_prompt), eval_set
    splits = load_named(align.dataset_name, align.dataset_config)
    if align.dataset_train_split not in splits:
        raise DatasetError(f"dataset {align.dataset_name!r} has no split {align.dataset_train_split!r} "
                           f"(has {', '.join(splits)}); see --dataset_train_split")
    local = Path(align.dataset_name)
    root = local if local.is_dir() else hub_snapshot(align.dataset_name)

    def one(split: str) -> datasets.Dataset:
        return prepare(splits[split], method, f"{align.dataset_name} [{split}]", root, align.system_prompt,
                       strict_columns=False)

    test = align.dataset_test_split
    if eval_set is None and test in splits:
        eval_set = one(test)
    return one(align.dataset_train_split), eval_set
