"""What both engines need to know about a model's tokens and images.

Prompts arrive with one placeholder per image; this module knows how many positions each image
really takes, and (for the transformers engine) builds the expanded, padded model inputs.
"""

import json
from pathlib import Path

import torch
from PIL import Image

from runtime.torchvision_compat import load_processor
from server.engines import EnginePrompt


class ModelProcessing:
    def __init__(self, model_path: str, trust_remote_code: bool = False, mm_processor_kwargs: dict | None = None):
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.is_vlm = hasattr(config, "vision_config")
        # As vLLM does with --mm-processor-kwargs: call-time overrides of the image processor
        # (max_pixels, min_pixels), so both count an image's tokens alike.
        self.mm_kwargs = dict(mm_processor_kwargs or {})
        if self.is_vlm:
            self.processor = load_processor(model_path, trust_remote_code=trust_remote_code)
            self.tokenizer = self.processor.tokenizer
            self.image_processor = self.processor.image_processor
            self.image_token_id = config.image_token_id
            # Never sampled (TRL's local generation suppresses them too): a completion holding a
            # placeholder cannot be trained on, since the model would look for image features
            # that do not exist, and it would break the one-placeholder-per-image rule of the
            # next turn's prompt.
            self.suppressed_token_ids = sorted(
                {t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None})
            self.merge_size = self.image_processor.merge_size
            text_config = config.get_text_config()
        else:
            self.processor = None
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

    def image_tokens(self, image: Image.Image) -> int:
        patches = self.image_processor.get_number_of_image_patches(image.height, image.width, self.mm_kwargs)
        return patches // (self.merge_size**2)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None,
                        template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a chat (HF message format), one placeholder per image part, rendered by the
        model's chat template (or `chat_template`) exactly as transformers renders it."""
        ids = self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template,
                                                 add_generation_prompt=True, tokenize=True,
                                                 **(template_kwargs or {}))
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def model_inputs(self, prompts: list[EnginePrompt], device: str) -> dict:
        """Left-padded `generate` inputs with each image placeholder expanded to its real length."""
        images = [img for p in prompts for img in p.images]
        extra = {}
        counts = iter(())
        if images:
            vision = self.image_processor(images=images, return_tensors="pt", **self.mm_kwargs)
            grid = vision["image_grid_thw"]
            counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
            extra = {"pixel_values": vision["pixel_values"].to(device), "image_grid_thw": grid.to(device)}
        rows = []
        for p in prompts:
            row = []
            for t in p.prompt_ids:
                row.extend([t] * next(counts) if t == self.image_token_id else [t])
            rows.append(row)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention_mask[i, width - len(r) :] = 1
        if self.processor is not None:
            # transformers 5 places image tokens in M-RoPE by these types; without them the
            # positions of image tokens are wrong and outputs drift from the processor's path
            types = self.processor.create_mm_token_type_ids(input_ids.tolist())
            extra["mm_token_type_ids"] = torch.tensor(types, dtype=torch.long, device=device)
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), **extra}
