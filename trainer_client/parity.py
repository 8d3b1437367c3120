"""The step-0 parity check (`--parity_check refuse|warn|off`, server and colocate modes).

Before the first optimizer step the trainer checks that its rollouts come from its own model reading its
own prompts. A broken weight sync, a chat template or processor pixel budget set differently on the two
sides, an adapter applied another way: each shows at once as a gap between the sampler's logprobs and
the trainer's, and a run that trains through it moves its reward for a while and then collapses.

1. Before the first batch is generated (server mode), the first row's prompt is sent to every server
   twice, as the chat messages (rendered by the server's chat template) and as the trainer's token ids
   with its images (expanded by the server's processor). The server's ids must be the trainer's
   rendering of the same chat, and its prompt length (`prompt_tokens`, images expanded) the length of the
   trainer's expanded ids. Either difference names its cause exactly.
2. On the first batch, the sampler's logprobs against the trainer's forward on the same tokens
   (`rollout_metrics`): a mean |logprob difference| past `tolerance()` is refused, naming what was
   compared, the gap, the tolerance and the usual causes in order.

`refuse` stops the run with that message; `warn` logs it and trains on.
"""

import logging
from dataclasses import dataclass, field

from trainer_client import trl_seam
from trainer_client.sampler import image_tokens
from trainer_client.video_training import video_frames_in, without_video_parts

log = logging.getLogger(__name__)

MODES = ("refuse", "warn", "off")

# Mean |logprob difference| per token (nats) a healthy setup stays under, by the coarser of the two sides'
# compute dtypes (docs/health.md). float32: the largest healthy gap measured here, on both engines and in
# colocate mode (tiny random VLMs, CPU), was 0.0052, all of it the placeholder tokens the server never
# samples (2 of a 454-token vocabulary; colocate's, which samples them, is 1e-7); 0.02 is 4x that and 7x
# under the smallest broken setup measured (0.14, weights not pushed). bfloat16 keeps 8 bits of mantissa: a healthy bf16 run's step-0 gap is about
# 0.017 nats/token (published, GPU), and 0.1 is 6x that; silently broken sharded syncs measured 1.33 to
# 66.5. float16 (11 bits) takes bfloat16's, conservatively.
TOLERANCE = {"float32": 0.02, "bfloat16": 0.1, "float16": 0.1}
_PRECISION = ("float32", "float16", "bfloat16")  # finest first


def coarser(*dtypes: str | None) -> str:
    """The coarser compute dtype of the two sides; an unknown side counts as bfloat16."""
    known = [d if d in _PRECISION else "bfloat16" for d in dtypes]
    return max(known, key=_PRECISION.index)


def tolerance(*dtypes: str | None) -> float:
    return TOLERANCE[coarser(*dtypes)]


@dataclass
class Side:
    """What samples the rollouts (a server's URL and engine, or TRL's colocated vLLM) and in which dtype."""

    what: str
    dtype: str | None
    servers: int = 0  # align-serve servers probed before the first batch; 0: nothing to probe
    lora: str | None = None  # a LoRA run: "adapter" (the server applies the adapter) or "merged"


@dataclass
class Probe:
    """What the servers made of the first row's prompt: per cause (1: chat template, 2: processor pixel
    budget) a line saying whether it holds alike, and the causes found different."""

    lines: dict[int, str] = field(default_factory=dict)
    differs: list[int] = field(default_factory=list)


def _snippet(tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.decode(ids[max(0, at - 3): at + 5]))


def _budget(processor) -> str:
    """An image processor's size settings (the pixel budget), as it holds them."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    fields = size if isinstance(size, dict) else vars(size) if size is not None else {}
    return ", ".join(f"{k} {v}" for k, v in fields.items() if v is not None) or "unknown settings"


def probe_servers(trainer, client, servers: int, row: dict) -> Probe:
    """Step 1 above, on the main process: `row` is the first of the first batch."""
    from trl.data_utils import prepare_multimodal_messages

    from trainer_client.tools import environment_names

    prompt = row.get("prompt")
    if not isinstance(prompt, list):  # an environment supplies it, or a plain-text prompt: nothing to render
        return Probe({1: "not checked (the first row has no chat prompt)", 2: "not checked"})
    images = row.get("images") or ([row["image"]] if row.get("image") is not None else [])
    messages = prepare_multimodal_messages(prompt, images=images) if images else prompt
    videos = video_frames_in(messages)  # the row's sampled frames (VideoTraining.rows_with_frames)
    probe = Probe()
    # Messages take no video parts on the wire (videos go with prompt_ids): the template is compared without them.
    for cause, (line, differs) in ((1, _template(trainer, client, servers, without_video_parts(messages), images)),
                                   (2, _expansion(trainer, client, servers, messages, images, videos,
                                                  environment_names(trainer, [row])))):
        probe.lines[cause] = line
        if differs:
            probe.differs.append(cause)
    return probe


def _template(trainer, client, servers: int, messages: list[dict], images: list) -> tuple[str, bool]:
    """Whether every server renders the chat `messages` to the ids the trainer's template gives them."""
    tokenizer = trl_seam.tokenizer(trainer)
    rendered = tokenizer(trl_seam.render_chat(trainer, messages), add_special_tokens=False)["input_ids"]
    wire = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
            for m in messages]
    answer = client.generate(messages=[wire] * servers, images=[images] * servers, max_tokens=1, temperature=0.0,
                             logprobs=False)
    for url, result in zip(client.base_urls, answer.results, strict=True):
        theirs = result.prompt_ids
        if theirs != rendered:
            at = next((k for k, (a, b) in enumerate(zip(theirs, rendered, strict=False)) if a != b),
                      min(len(theirs), len(rendered)))
            return (f"DIFFERS: {url} renders the first row's chat to {len(theirs)} ids, the trainer's template to "
                    f"{len(rendered)}; from id {at} the server has {_snippet(tokenizer, theirs, at)}, the trainer "
                    f"{_snippet(tokenizer, rendered, at)}. Rollouts go as token ids, but every client that sends "
                    "messages (the OpenAI routes, an agent, /v1/generate with messages) prompts the model unlike "
                    "training: serve with the trainer's chat template (align-serve --chat-template, or none: the "
                    "model's own)"), True
    return f"alike (the server renders the first row's chat to the trainer's {len(rendered)} ids)", False


def _expansion(trainer, client, servers: int, messages: list[dict], images: list, videos: list,
               environments) -> tuple[str, bool]:
    """Whether every server expands the trainer's ids of `messages`, their `images` and `videos` to as many
    positions."""
    expanded = trl_seam.tokenize_prompts(trainer, [messages], environments)[0]
    tokens = image_tokens(trainer)
    ids = tokens.unexpand(expanded, [image.size for image in images], [v.shape for v in videos]
                          ) if (images or videos) and tokens else list(expanded)
    answer = client.generate(prompt_ids=[ids] * servers, images=[images] * servers, max_tokens=1,
                             temperature=0.0, logprobs=False, videos=[videos] * servers if videos else None)
    sent = len(ids)
    for url, result in zip(client.base_urls, answer.results, strict=True):
        if result.prompt_tokens is None:
            return "not checked (the server does not report prompt_tokens)", False
        if result.prompt_tokens != len(expanded):
            return (f"DIFFERS: {url} expands the first prompt ({sent} ids, {len(images)} image(s)) to "
                    f"{result.prompt_tokens} positions, the trainer's processor to {len(expanded)}: each image is "
                    "cut into another number of patches, so the server's model reads other image tokens than the "
                    "trainer scores. Give align-serve the trainer's processor budget (--mm-processor-kwargs; the "
                    f"trainer's image processor sizes images by {_budget(trainer.processing_class)}) or the trainer "
                    "the server's"), True
    if videos:
        return (f"alike ({len(images)} image(s), {len(videos)} video(s): {len(expanded)} positions on both sides)",
                False)
    if images:
        return f"alike ({len(images)} image(s): {len(expanded)} positions on both sides)", False
    return f"alike ({len(expanded)} positions; no image in the first row)", False


class ParityCheck:
    """The check's state for one run: `probe` before the first batch, `judge` on its metrics."""

    def __init__(self, mode: str, trainer_dtype: str, sampler: Side):
        self.mode, self.trainer_dtype, self.sampler = mode, trainer_dtype, sampler
        self.probe: Probe | None = None
        self.values: dict[str, float] | None = None  # the first batch's rollout metrics
        self.tokens = 0  # completion tokens compared

    @property
    def pending(self) -> bool:
        return self.mode != "off" and self.values is None

    @property
    def tolerance(self) -> float:
        return tolerance(self.trainer_dtype, self.sampler.dtype)

    def probed(self, probe: Probe) -> None:
        self.probe = probe
        if probe.differs:
            self._fail(f"the prompts differ between the trainer and the server ({self._cause(probe.differs[0])})")

    def judge(self, values: dict[str, float], tokens: int) -> None:
        self.values, self.tokens = values, tokens
        if values["logprob_diff/mean"] > self.tolerance:
            self._fail(f"the sampler's logprobs are not the trainer's model's (mean |logprob difference| "
                       f"{values['logprob_diff/mean']:.3g} nats/token, over the {self.tolerance:g} tolerance)")
        else:
            log.info("step-0 parity check: %s", self.gap_line())

    def gap_line(self) -> str:
        v = self.values
        return (f"mean |logprob difference| {v['logprob_diff/mean']:.3g} nats/token (max {v['logprob_diff/max']:.3g}), "
                f"K3 KL {v['k3_kl']:.3g}, IS ratio mean {v['is_ratio/mean']:.4f} [{v['is_ratio/min']:.3g}, "
                f"{v['is_ratio/max']:.3g}], ESS {v['ess']:.3f} over {self.tokens} completion tokens; tolerance "
                f"{self.tolerance:g} ({coarser(self.trainer_dtype, self.sampler.dtype)}: trainer "
                f"{self.trainer_dtype}, sampler {self.sampler.dtype or 'unknown'})")

    @staticmethod
    def _cause(n: int) -> str:
        return {1: "chat template", 2: "processor pixel budget", 3: "weights not pushed", 4: "adapter mismatch"}[n]

    def causes(self) -> list[str]:
        """The usual causes, in order, each with what this run showed of it."""
        probe = self.probe or Probe({1: "not checked (no server to render it)", 2: "not checked (no server)"})
        prompts_alike = self.probe is not None and not probe.differs and "not checked" not in probe.lines[1]
        gap = self.values is not None and self.values["logprob_diff/mean"] > self.tolerance
        if gap:
            weights = ("LIKELY: the prompts are alike on both sides, so the model that sampled is not the trainer's: "
                       if prompts_alike else "possible: ") + \
                ("its weights did not reach the sampler (a push that failed silently, a sharded gather that sent "
                 "shards, a name map that dropped tensors) or the server serves another checkpoint than --model")
        else:
            weights = ("not seen (the logprobs match)" if self.values is not None else
                       "not checked (the logprobs are compared on the first batch)")
        if self.sampler.lora is None:
            adapter = "no LoRA adapter in this run"
        elif not gap:
            adapter = "not seen"
        else:
            adapter = ("possible: the trainer's forward drops adapter activations (lora_dropout) where the sampler never "
                       "does")
            if self.sampler.lora == "adapter":
                adapter += (", or the server applies the adapter otherwise than PEFT (its scaling lora_alpha/r or "
                            "rsLoRA, rank/alpha patterns, target modules, or on top of weights it was merged into)")
        return [f"{n}. {self._cause(n)}: {line}" for n, line in
                ((1, probe.lines[1]), (2, probe.lines[2]), (3, weights), (4, adapter))]

    def message(self, headline: str) -> str:
        if self.values is None:  # stopped at the prompts, before the first batch
            compared = (f"the first row's prompt as {self.sampler.what} renders it from chat messages and expands "
                        "it from the trainer's token ids with its images, against the trainer's own rendering and "
                        "expansion")
        else:
            compared = (f"the first batch's sampled completion tokens, each token's logprob as {self.sampler.what} "
                        "sampled it against the trainer's forward on the same tokens")
        lines = [f"step-0 parity check: {headline}.", f"  compared: {compared}"]
        if self.values is not None:
            lines.append(f"  gap: {self.gap_line()}")
        lines += ["  usual causes, in order:", *(f"    {c}" for c in self.causes())]
        return "\n".join(lines)

    def _fail(self, headline: str) -> None:
        text = self.message(headline)
        if self.mode == "refuse":
            raise SystemExit(f"align-train: {text}\n  --parity_check warn trains anyway (saying this), "
                             "--parity_check off skips the check (docs/health.md)")
        log.warning("%s\n  training on (--parity_check warn)", text)
