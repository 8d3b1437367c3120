"""What the trainer asks its servers to sample: the parameters its mode sets, and each trajectory's token
budget (what it has left of max_completion_length across tool turns, and what fits in the server's
max_model_len), so a later tool turn is never refused for length."""

import torch

from protocol.schemas import Completion
from runtime.image_tokens import ImageTokens
from trainer_client.client import AlignClient
from trainer_client.video import split_media

# A never-sampled token's logit bias: finite, so that TRL's entropy (p * log p) stays 0 where -inf would make
# it NaN; far below any real logit (its softmax weight is exactly 0 in float32), and still finite in float16
# after TRL divides the logits by a temperature down to 0.2.
NEVER = -1e4


def image_tokens(trainer) -> ImageTokens | None:
    """The trained model's image tokens (None for a text-only model): TRL's prompt ids hold each image
    expanded by the processor, the server takes one marker per image."""
    processor = trainer.processing_class
    return ImageTokens(processor, trainer.model.config) if getattr(processor, "image_token", None) else None


def sampled_vocabulary_only(model, never_sampled: list[int]) -> None:
    """`model`'s distribution over the tokens the servers may sample. They never sample an image's tokens
    (runtime/families.py), so each logprob they return is over the rest of the vocabulary: the trainer's
    forward, without this, spread the same token's probability over the whole of it, and the importance
    ratio came out as 1 minus the mass the model put on those tokens (a tiny random Idefics3, whose 482-token
    vocabulary holds 39 row/column and wrapper tokens: 0.92 every step, refused by the step-0 parity check).
    The policy trained is then the one sampled from.

    A bias on the LM head, since TRL's loss reads the head's weight and bias itself (its fused log-softmax),
    never the head's output; a buffer left out of state_dict(), so nothing saved or pushed changes. (No family's
    head has a bias of its own.)"""
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise ValueError(f"{type(model).__name__}'s LM head has a bias: its never-sampled tokens need another way")
    # out_features: ZeRO-3 leaves each rank's weight an empty partition, the layer still knows its size
    bias = torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
    bias[never_sampled] = NEVER
    del head._parameters["bias"]
    head.register_buffer("bias", bias, persistent=False)


def generate(client: AlignClient, prompt_ids: list[list[int]], media: list[list], **kwargs):
    """`client.generate` for prompts with one marker per image and per video, each prompt's `media` its images
    and then its videos (`VideoFrames`)."""
    split = [split_media(m) for m in media]
    return client.generate(prompt_ids=prompt_ids, images=[images for images, _ in split],
                           videos=[videos for _, videos in split] if any(v for _, v in split) else None, **kwargs)


class Sampler:
    def __init__(self, trainer, client: AlignClient | None):
        self.trainer = trainer
        self.client = client  # None on every process but the main one
        self.images = image_tokens(trainer)

    def unexpand(self, prompt_ids, media) -> list[int]:
        """TRL's ids of a prompt (each of its `media`, images and `VideoFrames`, expanded by the processor) as
        the server takes them."""
        if not media:
            return list(prompt_ids)
        images, videos = split_media(media)
        return self.images.unexpand(prompt_ids, [image.size for image in images],
                                    [v.shape for v in videos])

    def params(self, n: int) -> dict:
        """The sampling parameters as the trainer's mode sets them now, `n` completions per prompt, for a
        whole first turn (`sample` lowers `max_tokens` per turn to what each trajectory has left)."""
        t = self.trainer
        max_tokens = t.max_completion_length
        if not t.model.training:
            # Evaluation is greedy (TRL samples there too): two evals of the same weights score the same.
            return dict(n=n, temperature=0.0, max_tokens=max_tokens, logprobs=True)
        return dict(n=n, temperature=t.temperature, top_p=t.top_p,
                    top_k=t.top_k if t.top_k is not None else -1, min_p=t.min_p or 0.0,
                    repetition_penalty=t.repetition_penalty, max_tokens=max_tokens, logprobs=True)

    def max_model_len(self) -> int:
        """The server's: prompt and completion tokens of a sequence, image runs expanded."""
        return self.client.info().limits.max_model_len

    def sample(self, prompts, images, used, params: dict, check, empty_version: int) -> list[Completion]:
        """`params["n"]` completions per prompt (expanded image runs), each asked for no more tokens than its
        trajectory has left of max_completion_length (`used`: per prompt, the completion tokens it already
        holds) and than fit in the server's max_model_len; `check` sees each answer (it may refuse it). A
        tool turn with nothing left gets an empty completion, of weight_version `empty_version`; a first turn
        whose prompt alone fills max_model_len is asked as it is, for the server's 400."""
        n = params["n"]
        max_model_len = self.max_model_len()
        limit = self.trainer.max_completion_length
        budgets = [max(0, min(limit - u, max_model_len - len(p))) for p, u in zip(prompts, used, strict=True)]
        budgets = [limit if b == 0 and u == 0 else b for b, u in zip(budgets, used, strict=True)]
        out: list[list[Completion] | None] = [None] * len(prompts)
        for budget in sorted(set(budgets)):
            rows = [i for i, b in enumerate(budgets) if b == budget]
            if budget == 0:
                empty = Completion(token_ids=[], logprobs=[], text="", finish_reason="length",
                                   weight_version=empty_version)
                for i in rows:
                    out[i] = [empty] * n
                continue
            answer = generate(self.client, [self.unexpand(prompts[i], images[i]) for i in rows],
                              [images[i] for i in rows], check=check, **{**params, "max_tokens": budget})
            for i, result in zip(rows, answer.results, strict=True):
                out[i] = result.completions
        return [c for cs in out for c in cs]
