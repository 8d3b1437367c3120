"""What both engines need to know about a model's tokens and images.

Prompts arrive with one marker per image, as the model's chat template renders it; the model's own
processor says what each one expands to (`runtime.image_tokens`), hence how many positions a prompt
really takes, and (for the transformers engine) the expanded, padded model inputs. The model's family
(`runtime.families`) says which tokens a completion must never hold.
"""

import json
import logging
from pathlib import Path

import torch

from runtime.families import family_of
from runtime.image_tokens import ImageTokens, VideoShape, complete_pixel_budgets, video_metadata
from runtime.torchvision_compat import load_processor
from server.engines import EnginePrompt

log = logging.getLogger(__name__)

PER_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")  # one value per input id: built for our ids, not the processor's


class ModelProcessing:
    def __init__(self, model_path: str, trust_remote_code: bool = False, mm_processor_kwargs: dict | None = None):
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.family = family_of(config)  # raises UnknownFamily for a VLM of no family known here
        self.is_vlm = self.family is not None
        # As vLLM does with --mm-processor-kwargs: call-time overrides of the image processor
        # (max_pixels, min_pixels), so both count an image's tokens alike.
        self.mm_kwargs = dict(mm_processor_kwargs or {})
        if self.is_vlm:
            self.processor = load_processor(model_path, trust_remote_code=trust_remote_code)
            self.tokenizer = self.processor.tokenizer
            self.mm_kwargs, completed = complete_pixel_budgets(self.processor, self.mm_kwargs)
            for line in completed:
                log.info("--mm-processor-kwargs: %s", line)
            self.images = ImageTokens(self.processor, config, self.mm_kwargs)
            self.image_token_id = self.images.marker_id
            # Never sampled (TRL's local generation suppresses the feature token too): a completion holding
            # one cannot be trained on, since the model would look for image features that do not exist,
            # and it would break the one-marker-per-image rule of the next turn's prompt.
            self.suppressed_token_ids = self.images.never_sampled
            self.token_types = next((k for k in PER_TOKEN_INPUTS if k in self.processor.model_input_names), None)
            text_config = config.get_text_config()
        else:
            self.processor = self.images = self.token_types = None
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            self.image_token_id = None
            self.suppressed_token_ids = []
            text_config = config
        self.max_position_embeddings = text_config.max_position_embeddings
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        eos = set()
        gen_path = Path(model_path) / "generation_config.json"
        if gen_path.exists():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)

    @property
    def video_token_id(self) -> int | None:
        """The marker a prompt holds once per video; None where the server takes no video."""
        return self.images.video_marker_id if self.is_vlm else None

    def video_refusal(self) -> str | None:
        """Why the served model takes no video, in one line; None when it does."""
        if not self.is_vlm:
            return "the served model is text-only"
        if self.video_token_id is None:
            return self.family.video_refusal() or (f"{self.family.name}'s processor was loaded without its video "
                                                   "processor (transformers' video processors need torchvision)")
        return self.images.video_kwargs_problem()

    def expanded_ids(self, prompt: EnginePrompt) -> list[int]:
        """The prompt's ids with each image's and video's marker expanded, as the model sees them."""
        if not prompt.images and not prompt.videos:
            return list(prompt.prompt_ids)
        return self.images.expand(prompt.prompt_ids, [image.size for image in prompt.images],
                                  [VideoShape(len(v), *v[0].size) for v in prompt.videos])

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None,
                        template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a chat (HF message format), one marker per image part, rendered by the model's chat
        template (or `chat_template`) exactly as transformers renders it. A VLM's template gets every
        non-empty text as a part, as TRL hands it chats (Idefics3's and LLaVA-OneVision's render a plain
        string as nothing)."""
        if self.is_vlm:
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                        if isinstance(m.get("content"), str) and m["content"] else m for m in messages]
        ids = self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template,
                                                 add_generation_prompt=True, tokenize=True,
                                                 **(template_kwargs or {}))
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def model_inputs(self, prompts: list[EnginePrompt], device: str) -> dict:
        """Left-padded `generate` inputs with each image and video marker expanded, and the processor's image and
        video inputs."""
        rows = [self.expanded_ids(p) for p in prompts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention_mask[i, width - len(r) :] = 1
        extra = {}
        with_images = [p for p in prompts if p.images]
        if with_images:
            # The processor's own image inputs (pixel values, grids, tile masks, sizes), for the images in
            # the order their markers come; each prompt's markers alone as its text.
            vision = self.processor(text=[self.images.marker * len(p.images) for p in with_images],
                                    images=[p.images for p in with_images], return_tensors="pt", padding=True,
                                    **self.mm_kwargs)
            extra = {k: v.to(device) for k, v in vision.items()
                     if k not in ("input_ids", "attention_mask", *PER_TOKEN_INPUTS)}
        with_videos = [p for p in prompts if p.videos]
        if with_videos:
            # The video processor's inputs (pixel_values_videos, video_grid_thw, Qwen2.5-VL's second_per_grid_ts),
            # videos in the order their markers come, each a list of frames: the frames the client sampled, none
            # resampled here, with their timing.
            motion = self.processor(text=[self.images.video_marker * len(p.videos) for p in with_videos],
                                    videos=[v for p in with_videos for v in p.videos],
                                    video_metadata=[video_metadata(len(v), fps) for p in with_videos
                                                    for v, fps in zip(p.videos, p.video_fps, strict=True)],
                                    return_tensors="pt", padding=True, **self.mm_kwargs)
            extra |= {k: v.to(device) for k, v in motion.items()
                      if k not in ("input_ids", "attention_mask", *PER_TOKEN_INPUTS)}
        if self.token_types is not None:
            # Which positions are image tokens: transformers 5 places them in M-RoPE by it (Qwen-VL), Gemma 3
            # attends bidirectionally within each image by it.
            types = self.processor.create_mm_token_type_ids(input_ids.tolist())
            extra[self.token_types] = torch.tensor(types, dtype=torch.long, device=device)
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), **extra}

