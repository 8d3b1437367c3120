"""`align-train sft`: TRL's SFTTrainer on the formats align-train reads, the loss on assistant tokens only
(tool-use traces: the tool turns and their images are context, not targets)."""

import json
from pathlib import Path

import pytest

from examples.demo import PROMPT, make_dataset
from examples.tiny_model import build
from runtime.torchvision_compat import load_processor
from tests.tool_model import calling_trajectory
from tests.utils import ServerProcess
from trainer_client.cli import run
from trainer_client.client import AlignClient
from trainer_client.data import DatasetError, load_train_dataset
from trainer_client.sft import AssistantTurnsCollator

FLAGS = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0",
         "--logging_steps", "1"]


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_lowers_the_loss_and_saves_a_model_align_serve_loads(tiny_vlm, tmp_path, log_dir):
    data = make_dataset(tmp_path / "data", 16, seed=0, method="grpo")  # prompt + image + solution rows
    trainer = run(["sft", "--model", str(tiny_vlm), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                   "--max_steps", "8", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", *FLAGS])
    curve = losses(trainer)
    assert len(curve) == 8 and curve[-1] < 0.8 * curve[0], curve
    server = ServerProcess(tmp_path / "out", "transformers", log_dir=log_dir).wait_ready(300)
    try:
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]]
        out = AlignClient(server.url).generate(messages=messages, images=[[trainer.train_dataset[0]["images"][0]]],
                                                n=1, temperature=0.0, max_tokens=4)
        assert len(out.results[0].completions[0].token_ids) > 0
    finally:
        server.stop()


def trace_row(root: Path) -> dict:
    """tests/tool_model.py's two-call trajectory as an SFT row: image parts as placeholders, the images
    (the question's, then each tool result's) in order in `images`."""
    messages, images = [], []
    for m in calling_trajectory():
        if isinstance(m["content"], list):
            parts = []
            for p in m["content"]:
                if p["type"] == "image":
                    images.append(f"img{len(images)}.png")
                    p["image"].save(root / images[-1])
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            m = {**m, "content": parts}
        messages.append(m)
    return {"messages": messages, "images": images}


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny_qwen3_vl"), "qwen3_vl", seed=0)


@pytest.fixture()
def traces(tmp_path) -> Path:
    (tmp_path / "traces.jsonl").write_text(json.dumps(trace_row(tmp_path)) + "\n")
    return tmp_path / "traces.jsonl"


def test_tool_traces_train_on_the_assistant_tokens_only(qwen3_vl, traces):
    from tests.tool_model import zoom

    processor = load_processor(qwen3_vl)
    dataset = load_train_dataset(traces, "sft")
    batch = AssistantTurnsCollator(processor, [zoom])([dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert labels.shape == ids.shape
    learnt = processor.tokenizer.decode(ids[labels != -100])
    call = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call><|im_end|>'
    assert learnt == call + call + "red<|im_end|>"  # two calls and the answer; no prompt, tool turn or image
    assert (labels[ids == processor.image_token_id] == -100).all()
    # the tool's schema is in the prompt, as GRPO's tool loop renders it
    assert '"name": "zoom"' in processor.tokenizer.decode(ids[: int((labels != -100).nonzero()[0])])


def test_assistant_only_loss_false_trains_on_the_whole_sequence(qwen3_vl, traces):
    from tests.tool_model import zoom

    batch = AssistantTurnsCollator(load_processor(qwen3_vl), [zoom], assistant_only=False)(
        [load_train_dataset(traces, "sft")[0]])
    assert (batch["labels"] == batch["input_ids"]).all()  # one row: no padding to leave out


def test_sft_on_tool_traces_runs_through_the_cli(qwen3_vl, traces, tmp_path):
    trainer = run(["sft", "--model", str(qwen3_vl), "--dataset", str(traces), "--output_dir", str(tmp_path / "out"),
                   "--tools", "tests.tool_model:zoom", "--max_steps", "3", "--learning_rate", "1e-2", *FLAGS])
    curve = losses(trainer)
    assert len(curve) == 3 and curve[-1] < curve[0], curve


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi"}, r"SFT needs a `messages` column .* or a prompt column"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"row 1: the conversation has no assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
     r"row 1: the conversation has 1 image part\(s\) but the row gives 0 image\(s\)"),
])
def test_bad_sft_rows_are_refused_naming_the_row(row, message, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_train_dataset(tmp_path / "d.jsonl", "sft")
