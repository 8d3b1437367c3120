"""`align-train sft`: TRL's SFTTrainer on VLM conversations, tool-use traces included, with the loss on
the assistant's tokens only.

TRL's own assistant mask (`assistant_only_loss`) needs `{% generation %}` markers in the chat template
and, for vision datasets, transformers >= 5.18; TRL refuses it before (we run 5.17). So the collator
here finds the assistant turns itself: each one starts where the conversation before it, rendered with
the generation prompt, ends, and runs through its end-of-turn token. That holds for templates that
render earlier turns the same whatever follows (Qwen3-VL's does); a template that does not is refused
at the first batch rather than trained on the wrong tokens.
"""

import inspect
import json

from trl.data_utils import prepare_multimodal_messages

from trainer_client.video import VideoBudget, sample
from trainer_client.video_training import video_frames_in


class AssistantTurnsCollator:
    """Rows (`messages` as JSON, `images`, optionally `videos`) -> the processor's batch plus `labels`: the
    assistant's tokens, -100 elsewhere (system, user, tool turns, images, videos, padding). `tools`
    (callables) are rendered in the prompt as TRL's GRPO renders them, so a warm-up on traces sees the
    prompts GRPO will send. Each video is sampled into frames (`video.sample`, the run's `video_budget`)
    when its row is collated; the processor expands them (`pixel_values_videos`, `video_grid_thw`)."""

    def __init__(self, processor, tools: list, assistant_only: bool = True, end_token_ids: list[int] | None = None,
                 video_budget: VideoBudget | None = None):
        """`end_token_ids`: the tokens that end an assistant turn (the model's generation eos ids; Gemma 3's turn
        ends with `<end_of_turn>`, not its tokenizer's `<eos>`); default: the tokenizer's eos. `video_budget`:
        the run's (`video.resolve_budget`), needed when rows carry videos."""
        self.processor, self.tools, self.assistant_only = processor, tools or None, assistant_only
        self.ends = set(end_token_ids or []) | {processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)}
        self.video_budget = video_budget

    def _render(self, conversations: list[list[dict]], generation_prompt: bool = False) -> dict:
        # The processor takes each image and video part's payload, in order, as it renders the text: prefix
        # renders expand videos exactly as the whole conversation's. Each video's timing goes with it, as to
        # the server (Qwen2.5-VL's positions read it).
        videos = [v for c in conversations for v in video_frames_in(c)]
        timing = {"video_metadata": [v.metadata for v in videos]} if videos else {}
        return self.processor.apply_chat_template(
            conversations, tools=self.tools, add_generation_prompt=generation_prompt, tokenize=True,
            return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "right", **timing})

    def __call__(self, rows: list[dict]) -> dict:
        conversations = [with_media(json.loads(r["messages"]), r["images"],
                                    [sample(v, self.video_budget, "SFT batch") for v in r.get("videos") or []])
                         for r in rows]
        batch = self._render(conversations)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.clone()
        labels[mask == 0] = -100
        if self.assistant_only:
            labels[:] = -100
            for i, conversation in enumerate(conversations):
                for start, stop in self.assistant_spans(conversation, ids[i, : int(mask[i].sum())].tolist()):
                    labels[i, start:stop] = ids[i, start:stop]
        batch["labels"] = labels
        return batch

    def assistant_spans(self, conversation: list[dict], ids: list[int]) -> list[tuple[int, int]]:
        spans = []
        for k, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            start = self._start(conversation, k, ids)
            # the end-of-turn token is learnt: it stops generation
            stop = next((i + 1 for i in range(start, len(ids)) if ids[i] in self.ends), len(ids))
            spans.append((start, stop))
        return spans

    def _start(self, conversation: list[dict], k: int, ids: list[int]) -> int:
        """Where assistant message k's tokens start in `ids`: after the generation prompt that follows the turns
        before it (the Qwen-VL templates render an assistant turn so); else where the message first differs from
        itself with empty text (LLaVA-OneVision's template writes `assistant ` then a newline before a turn's text,
        but `assistant` and a newline as its generation prompt)."""
        before = self._render([conversation[:k]], generation_prompt=True)["input_ids"][0].tolist()
        if ids[: len(before)] == before:
            return len(before)
        earlier = len(self._render([conversation[:k]])["input_ids"][0])
        emptied = [*conversation[:k], {**conversation[k], "content": [{"type": "text", "text": ""}]}]
        empty = self._render([emptied])["input_ids"][0].tolist()
        start = next((i for i, (a, b) in enumerate(zip(ids, empty, strict=False)) if a != b), None)
        if ids[:earlier] != empty[:earlier] or start is None or start < earlier:
            raise ValueError("the chat template renders the turns before an assistant message differently once "
                             "the message follows, so its tokens cannot be told apart; use a template that keeps "
                             "earlier turns as rendered (Qwen3-VL's does)")
        return start


def with_media(messages: list[dict], images: list, videos: list | None = None) -> list[dict]:
    """The row's images in its image parts and its videos (sampled frames) in its video parts, each in
    order, tool messages' included (TRL's `prepare_multimodal_messages` leaves those to the tool loop,
    which fills them itself, and would turn an empty assistant content into a text part, which the
    template renders as a newline before a tool call the model never sampled). Text-only messages get
    the images, then the videos, before the first user message's text, as TRL's rows get images."""
    videos = videos or []
    if all(isinstance(m.get("content"), str) or m.get("content") is None for m in messages):
        filled = prepare_multimodal_messages(messages, images=images)
        if videos:
            k = next(i for i, m in enumerate(filled) if m["role"] == "user")
            parts = filled[k]["content"]
            at = next(i for i, p in enumerate(parts) if p.get("type") == "text")
            filled[k] = {**filled[k], "content": [*parts[:at], *({"type": "video", "video": v} for v in videos),
                                                  *parts[at:]]}
        return filled
    pending = {"image": iter(images), "video": iter(videos)}
    # a non-empty text as a part too, as TRL hands templates every text (Idefics3's and LLaVA-OneVision's
    # render a plain string as nothing)
    filled = [{**m, "content": [{**p, p["type"]: next(pending[p["type"]])} if p.get("type") in pending else p
                                for p in m["content"]]}
              if isinstance(m.get("content"), list) else
              {**m, "content": [{"type": "text", "text": m["content"]}]} if m.get("content") else m for m in messages]
    return filled


def environment_tools(factory) -> list:
    """The tools an environment offers, as TRL's GRPOTrainer lists them: its instance's public methods but
    `reset` and `get_reward`."""
    instance = factory()
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")]
