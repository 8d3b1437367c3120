"""Every VLM family (runtime/families.py) on both engines, token-exact, and every training path.

Per family and engine, one server for the module (`family`): its greedy answers equal transformers' own,
its prompt ids and logprobs equal what the trainer's forward computes, each trained sequence holds as many
image tokens as its images have features, and a GRPO run in server mode moves the served model to the
trainer's weights. The other paths (GSPO with async rollouts, dynamic sampling and a LoRA adapter; none
mode's GRPO, MPO and SFT; colocate) run two steps each. Where vLLM cannot serve a family faithfully, or a
template cannot render tools, the refusal is one line naming the family.
"""

import inspect
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from examples.tiny_model import ARCHS, build
from runtime.families import FAMILIES, UnknownFamily, family_of
from runtime.image_tokens import ImageTokens
from runtime.torchvision_compat import load_processor
from tests.utils import ServerProcess, assert_rollouts_match, random_image
from trainer_client import AlignClient
from trainer_client.cli import run
from trainer_client.client import AlignServerError

COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm",
          "true", "--save_strategy", "no", "--seed", "0", "--max_steps", "2"]
SMALL = [*COMMON, "--num_generations", "4", "--max_completion_length", "4", "--steps_per_generation", "1"]
REWARD = ["--reward_funcs", "tests.test_train:parity_reward"]
# LoRA on the language model's attention alone: one regular expression (TRL hands a single target to PEFT as
# one), since the SigLIP and InternViT towers name their attention q_proj/v_proj too.
LM_ATTENTION = ["--lora_target_modules", r".*(language_model|text_model)\..*\.(q_proj|v_proj)"]
VLLM_REFUSED = {"gemma3"}  # bidirectional attention within images: runtime/families.py
PROMPT = "What colour is the shape?"


def _family_params():
    out = []
    for arch in ARCHS:
        out.append(pytest.param((arch, "transformers"), id=f"{arch}-transformers"))
        if arch not in VLLM_REFUSED:
            out.append(pytest.param((arch, "vllm"), id=f"{arch}-vllm", marks=pytest.mark.vllm))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> its tiny model (seed 0), built once for the module."""
    built = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build(tmp_path_factory.mktemp(arch), arch, seed=0)
        return built[arch]

    return get


class Served:
    """One family on one engine: its model, processor, image tokens and server."""

    def __init__(self, arch: str, engine: str, path: Path, server: ServerProcess):
        self.arch, self.engine, self.path, self.server = arch, engine, path, server
        self.processor = load_processor(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.tokens = ImageTokens(self.processor, self.model.config)

    def client(self) -> AlignClient:
        return AlignClient(self.server.url, api_key=self.server.api_key)


@pytest.fixture(scope="module", params=_family_params())
def family(request, models, log_dir):
    """One server per family and engine, shared by the module's tests of it (pytest runs them together); the
    suite's shared vLLM server for Qwen2-VL (conftest.py)."""
    arch, engine = request.param
    path = models(arch)
    if (arch, engine) == ("qwen2_vl", "vllm"):
        yield Served(arch, engine, path, request.getfixturevalue("vllm_vlm"))
        return
    lora = family_of(AutoConfig.from_pretrained(path)).vllm_lora or engine == "transformers"
    server = ServerProcess(path, engine, log_dir=log_dir,
                           extra=["--enable-lora", "--max-lora-rank", "8"] if lora else [])
    try:
        server.wait_ready(600)
        yield Served(arch, engine, path, server)
    finally:
        server.stop()


def chats(arch: str) -> list[tuple[list[dict], list]]:
    """(messages, images): a square image, a wide one, and two images in one prompt (LLaVA-OneVision takes one)."""
    def ask(images):
        return [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": PROMPT}]}], images

    out = [ask([random_image(0)]), ask([random_image(1, size=96).resize((96, 48))])]
    if arch != "llava_onevision":
        out.append(ask([random_image(2), random_image(3, size=80).resize((48, 80))]))
    return out


def processor_inputs(served: Served, messages, images) -> dict:
    """The processor's inputs for a chat, as TRL builds them (the template writes any BOS)."""
    text = served.processor.apply_chat_template(messages, add_generation_prompt=True)
    return served.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)


def template_ids(tokenizer, messages) -> list[int]:
    """The chat's ids as the template renders them, one marker per image."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def local_greedy(model, tokens: ImageTokens, inputs: dict, n: int = 8) -> list[int]:
    """transformers' own greedy answer, never sampling an image's tokens (as both engines and TRL do)."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=tokens.never_sampled)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def forward_logprobs(served: Served, inputs: dict, completion: list[int]) -> list[float]:
    """The trainer's forward over prompt + completion: each completion token's logprob under the distribution
    it was sampled from (the image tokens, never sampled, left out of it)."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], dim=1)
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "token_type_ids",
                                                            "mm_token_type_ids")}
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            kwargs[key] = torch.tensor(served.processor.create_mm_token_type_ids(ids.tolist()))
    with torch.inference_mode():
        logits = served.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0].float()
        logits[:, served.tokens.never_sampled] = float("-inf")
        start = inputs["input_ids"].shape[1] - 1
        steps = logits[start:start + len(completion)].log_softmax(-1)
        return steps.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def image_features(model, processor, image) -> int:
    """Rows of image features the model computes for one image."""
    inputs = processor(text=[processor.image_token], images=[image], return_tensors="pt", add_special_tokens=False)
    get = model.model.get_image_features
    params = inspect.signature(get).parameters
    with torch.inference_mode():
        feats = get(**{k: v for k, v in inputs.items() if k in params and k not in ("input_ids", "attention_mask")})
    feats = feats.pooler_output if getattr(feats, "pooler_output", None) is not None else feats
    return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in ([feats] if torch.is_tensor(feats) else feats))


# ---- the wire contract, token for token --------------------------------------------------------------------

def test_server_greedy_and_logprobs_equal_the_trainers_forward(family):
    tokens, tok = family.tokens, family.processor.tokenizer
    with family.client() as client:
        for messages, images in chats(family.arch):
            inputs = processor_inputs(family, messages, images)
            expanded = inputs["input_ids"][0].tolist()
            sizes = [image.size for image in images]
            unexpanded = tokens.unexpand(expanded, sizes)
            # one marker per image, as the chat template renders it; the processor's expansion back from it
            assert unexpanded == template_ids(tok, messages)
            assert unexpanded.count(tokens.marker_id) == len(images)
            assert tokens.expand(unexpanded, sizes) == expanded
            # image tokens == image features
            features = sum(image_features(family.model, family.processor, image) for image in images)
            assert expanded.count(tokens.feature_id) == features

            by_chat = client.generate(messages=[messages], images=[images], temperature=0.0, max_tokens=8).results[0]
            by_ids = client.generate(prompt_ids=[unexpanded], images=[images], temperature=0.0, max_tokens=8).results[0]
            assert by_chat.prompt_ids == by_ids.prompt_ids == unexpanded
            got = by_chat.completions[0]
            assert got.token_ids == by_ids.completions[0].token_ids
            expected = local_greedy(family.model, tokens, inputs)
            assert got.token_ids and got.token_ids == expected[:len(got.token_ids)]
            gap = max(abs(a - b) for a, b in zip(got.logprobs, forward_logprobs(family, inputs, got.token_ids),
                                                 strict=True))
            assert gap < 1e-4, gap


def test_processor_expanded_ids_are_collapsed_or_refused_naming_the_token(family):
    messages, images = chats(family.arch)[0]
    expanded = processor_inputs(family, messages, images)["input_ids"][0].tolist()
    unexpanded = family.tokens.unexpand(expanded, [image.size for image in images])
    wrapped = set(expanded) & set(family.tokens.never_sampled) - {family.tokens.marker_id}
    with family.client() as client:
        if not wrapped:  # plain runs of the marker (Qwen-VL, LLaVA-OneVision): the client collapses them
            out = client.generate(prompt_ids=[expanded], images=[images], temperature=0.0, max_tokens=2)
            assert out.results[0].prompt_ids == unexpanded
            return
        with pytest.raises(AlignServerError) as refused:
            client.generate(prompt_ids=[expanded], images=[images], max_tokens=2)
    assert refused.value.status == 400 and "a token of an image's expansion" in refused.value.message
    assert refused.value.detail["field"] == "prompts[0].prompt_ids"


# ---- training through the server -------------------------------------------------------------------------

@pytest.fixture()
def trained_sequences(monkeypatch) -> list[tuple[list[int], list]]:
    """Every sequence TRL trains on (prompt + completion ids) with its images."""
    from trl import GRPOTrainer as TRLGRPOTrainer

    seen = []
    generate = TRLGRPOTrainer._generate

    def recorded(self, prompts):
        out = generate(self, prompts)
        prompt_ids, completion_ids, _, _, _, _, images, _ = out
        seen.extend((list(p) + list(c), list(imgs or [])) for p, c, imgs in
                    zip(prompt_ids, completion_ids, images or [None] * len(prompt_ids), strict=True))
        return out

    monkeypatch.setattr(TRLGRPOTrainer, "_generate", recorded)
    return seen


def check_serves(served: Served, model) -> list[int]:
    """The server answers a fresh prompt exactly as `model` does locally; returns that answer."""
    messages, images = chats(served.arch)[0]
    inputs = processor_inputs(served, messages, images)
    expected = local_greedy(model, served.tokens, inputs)
    with served.client() as client:
        got = client.generate(messages=[messages], images=[images], temperature=0.0,
                              max_tokens=8).results[0].completions[0].token_ids
    assert got and got == expected[:len(got)]
    return got


def test_grpo_in_server_mode_moves_the_served_model_to_the_trainers_weights(family, data, tmp_path,
                                                                          trained_sequences):
    before = check_serves(family, family.model)
    with family.client() as client:
        v = client.info(refresh=True).weight_version  # a shared server's versions go on counting
    trainer = run(["grpo", "--model", str(family.path), "--dataset", str(data / "grpo.jsonl"),
                   "--output_dir", str(tmp_path / "out"), *SMALL, *REWARD, "--learning_rate", "0.5",
                   "--vllm-mode", "server", "--server-url", family.server.url,
                   *(["--api_key", family.server.api_key] if family.server.api_key else [])])
    assert trainer.state.global_step == 2
    # the start push, then one per step: each step trained on the version the step before pushed
    assert [e["weight_version"] for e in trainer.state.log_history if "weight_version" in e] == [v + 1, v + 2]
    # TRL's importance-sampling correction ran on the server's logprobs, which are the trainer's model's
    assert all("sampling/importance_sampling_ratio/mean" in e for e in trainer.state.log_history if "loss" in e)
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    after = check_serves(family, trained)
    assert after != before, "the training must change the answer for this check to mean anything"
    # every trained sequence holds as many image tokens as its images have features
    assert trained_sequences
    for ids, images in trained_sequences:
        features = sum(image_features(trained, family.processor, image) for image in images)
        assert ids.count(family.tokens.feature_id) == features > 0


def test_gspo_async_dynamic_sampling_and_a_lora_adapter(family, data, tmp_path):
    """GSPO with --async_rollouts and --dynamic_sampling, training a LoRA adapter on the language model: pushed
    alone where the server takes adapters, merged where vLLM has no LoRA for the family (LLaVA-OneVision)."""
    served_lora = family.client().info(refresh=True).limits.max_lora_rank is not None
    trainer = run(["gspo", "--model", str(family.path), "--dataset", str(data / "grpo.jsonl"),
                   "--output_dir", str(tmp_path / "out"), *SMALL, *REWARD, "--learning_rate", "0.5",
                   "--vllm-mode", "server", "--server-url", family.server.url, "--async_rollouts",
                   "--dynamic_sampling", "--max_resample_rounds", "1", "--use_peft", "--lora_r", "8", *LM_ATTENTION,
                   *(["--api_key", family.server.api_key] if family.server.api_key else [])])
    assert trainer.state.global_step == 2
    assert trainer.vllm_generation.pusher.adapter_sync == served_lora
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    got = check_serves(family, model)
    with model.disable_adapter():
        messages, images = chats(family.arch)[0]
        base = local_greedy(model, family.tokens, processor_inputs(family, messages, images))
    assert got != base[:len(got)], "the adapter must change the answer for this check to mean anything"


# ---- refusals -----------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_vllm_refuses_gemma3_at_start_in_one_line(models, log_dir):
    server = ServerProcess(models("gemma3"), "vllm", log_dir=log_dir)
    try:
        assert server.proc.wait(300) == 1
    finally:
        server.stop()
    lines = [line for line in server.log_path.read_text().splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "Gemma 3 attends bidirectionally within each image" in lines[0]
    assert "serve it with the transformers engine, or with vLLM on a GPU" in lines[0]
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.vllm
def test_vllm_refuses_adapter_sync_for_llava_onevision_at_start(models, log_dir):
    server = ServerProcess(models("llava_onevision"), "vllm", log_dir=log_dir, extra=["--enable-lora"])
    try:
        assert server.proc.wait(300) == 1
    finally:
        server.stop()
    assert "vLLM serves no LoRA adapters on LLaVA-OneVision" in server.log_path.read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_an_adapter_on_the_vision_tower_is_refused_naming_the_module_and_the_way_out(arch, models):
    from protocol import LoraAdapter, TensorSpec
    from server.lora import AdapterRefused, check_adapter, lora_targets

    targets, others = lora_targets(str(models(arch)))
    towers = ("model.visual.", "model.vision_tower.", "model.vision_model.")
    tower = next(m for m in sorted(others) if m.startswith(towers))  # every family's tower holds linear layers
    tensors = [TensorSpec(name=f"base_model.model.{tower}.lora_{half}.weight", dtype="float32", shape=[8, 8])
               for half in "AB"]
    with pytest.raises(AdapterRefused, match=rf"targets {tower}, which is not a linear layer of the language model"
                                             r".*one regular expression, e\.g\. '.*\\\.\.\*\\\.\(q_proj\|v_proj\)'"):
        check_adapter(LoraAdapter(r=8, lora_alpha=16, target_modules=[tower.rsplit(".", 1)[1]]), tensors, targets,
                      others, max_rank=8)
    assert targets and not any(m.startswith(towers) for m in targets)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen3_vl"])
def test_tools_are_refused_where_the_template_cannot_render_them(arch, models, data, tmp_path):
    family = family_of(AutoConfig.from_pretrained(models(arch)))
    with pytest.raises(SystemExit, match=rf"chat template of .* \(a {family.name} model\) cannot render tool calls"):
        run(["grpo", "--model", str(models(arch)), "--dataset", str(data / "grpo.jsonl"), "--output_dir",
             str(tmp_path / "out"), *SMALL, *REWARD, "--tools", "tests.tool_model:zoom"])


# ---- none mode: GRPO, MPO and SFT with TRL's own generation ---------------------------------------------

@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen2_vl"])  # test_train.py and test_sft.py run it
def test_none_mode_grpo_mpo_and_sft_train_every_family(arch, models, data, tmp_path):
    path = models(arch)
    grpo = run(["grpo", "--model", str(path), "--dataset", str(data / "grpo.jsonl"), "--output_dir",
                str(tmp_path / "grpo"), *SMALL, *REWARD, "--vllm-mode", "none", "--learning_rate", "1e-2"])
    mpo = run(["mpo", "--model", str(path), "--dataset", str(data / "mpo.jsonl"), "--output_dir", str(tmp_path / "mpo"),
               *COMMON, "--learning_rate", "1e-2"])
    sft = run(["sft", "--model", str(path), "--dataset", str(data / "grpo.jsonl"), "--output_dir", str(tmp_path / "sft"),
               *COMMON, "--learning_rate", "1e-2"])
    base = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    for trainer in (grpo, mpo, sft):
        assert trainer.state.global_step == 2
        trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        assert any(not torch.equal(base[k], trained[k]) for k in base), type(trainer).__name__


def test_gemma3_trains_with_token_type_ids_on_its_own_image_tokens(models, data, tmp_path, monkeypatch):
    """TRL builds Gemma 3's `token_type_ids` (bidirectional attention within each image) from a second processor
    call; with the template's BOS doubled there they lay one position off the ids (trl_seam.processor_for_trl)."""
    import functools

    import transformers

    seen = []
    forward = transformers.Gemma3ForConditionalGeneration.forward

    @functools.wraps(forward)  # generate() reads the model's inputs off forward's signature
    def recorded(self, *args, **kwargs):
        ids, types = kwargs.get("input_ids"), kwargs.get("token_type_ids")
        if ids is not None and types is not None:
            seen.append(ids.shape == types.shape and bool((types == (ids == self.config.image_token_id)).all()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Gemma3ForConditionalGeneration, "forward", recorded)
    run(["grpo", "--model", str(models("gemma3")), "--dataset", str(data / "grpo.jsonl"), "--output_dir",
         str(tmp_path / "out"), *SMALL, *REWARD, "--vllm-mode", "none", "--max_steps", "1"])
    assert seen and all(seen)  # generation's forwards and the loss's


# ---- colocate: TRL's vLLM in the trainer process -----------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in VLLM_REFUSED])
def test_colocate_serves_the_trained_weights(arch, models, data, tmp_path):
    from vllm import SamplingParams

    from runtime import kv_cache

    path = models(arch)
    trainer = run(["grpo", "--model", str(path), "--dataset", str(data / "grpo.jsonl"), "--output_dir",
                   str(tmp_path / "out"), *SMALL, *REWARD, "--learning_rate", "0.5", "--vllm-mode", "colocate",
                   "--vllm_gpu_memory_utilization", "0.001", "--vllm_max_model_length", "512",
                   "--vllm_enable_sleep_mode", "false"])
    assert trainer.state.global_step == 2
    # 0.001 of the NUMA node is negative on any machine: the fixed default KV cache runs (runtime/kv_cache.py)
    llm = trainer.vllm_generation.llm
    assert llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == \
        kv_cache.default_kv_cache_bytes(str(path), 512)
    # TRL's vLLM samples the trainer's model: its logprobs agree with the trainer's forward (TRL's own old
    # logprobs pass forms the ratio here, and the rollout/* metrics with it)
    assert all("sampling/importance_sampling_ratio/mean" in e for e in trainer.state.log_history if "loss" in e)
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2
    # the in-process vLLM answers as the trained model once synced: every weight loaded, under vLLM's names
    trainer.vllm_generation.sync_weights()
    model, processor = trainer.accelerator.unwrap_model(trainer.model).eval(), trainer.processing_class
    tokens = ImageTokens(processor, model.config)
    messages, images = chats(arch)[0]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    ids = tokens.unexpand(inputs["input_ids"][0].tolist(), [i.size for i in images])
    params = SamplingParams(temperature=0.0, max_tokens=8)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, params, use_tqdm=False)
    got = list(out[0].outputs[0].token_ids)
    base = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert got == local_greedy(model, tokens, inputs)[:len(got)] != local_greedy(base, tokens, inputs)[:len(got)]


@pytest.mark.vllm
def test_colocate_refuses_gemma3_on_cpu(models, data, tmp_path):
    with pytest.raises(SystemExit, match=r"colocate: Gemma 3 attends bidirectionally"):
        run(["grpo", "--model", str(models("gemma3")), "--dataset", str(data / "grpo.jsonl"), "--output_dir",
             str(tmp_path / "out"), *SMALL, *REWARD, "--vllm-mode", "colocate"])


# ---- the family table ------------------------------------------------------------------------------------

def test_each_arch_is_its_own_family_and_other_vlms_are_refused_by_model_type(models):
    assert [family_of(AutoConfig.from_pretrained(models(arch))).name for arch in ARCHS] == [f.name for f in FAMILIES]
    assert family_of({"model_type": "qwen2"}) is None  # text-only: no vision_config
    with pytest.raises(UnknownFamily, match=r"'paligemma' is not a VLM family .*qwen2_vl.*docs/models.md"):
        family_of({"model_type": "paligemma", "vision_config": {}})


def test_a_vlm_of_another_family_is_refused_at_start_in_one_line(tmp_path, data, log_dir):
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path / "paligemma")
    server = ServerProcess(tmp_path / "paligemma", "transformers", log_dir=log_dir)
    try:
        assert server.proc.wait(120) == 1
    finally:
        server.stop()
    lines = [line for line in server.log_path.read_text().splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "'paligemma' is not a VLM family vlm-align serves and trains" in lines[0], lines
    with pytest.raises(SystemExit, match=r"--model .*paligemma: 'paligemma' is not a VLM family .*--vllm-mode none"):
        run(["grpo", "--model", str(tmp_path / "paligemma"), "--dataset", str(data / "grpo.jsonl"), "--output_dir",
             str(tmp_path / "out"), *SMALL, *REWARD, "--vllm-mode", "server", "--server-url", "http://127.0.0.1:9"])


def test_siglip_towers_are_renamed_for_vllm_and_nothing_else():
    gemma = next(f for f in FAMILIES if f.name == "Gemma 3")
    assert gemma.vllm_weight_name("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == \
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert gemma.vllm_weight_name("model.vision_tower.vision_model.post_layernorm.weight") == \
        "model.vision_tower.vision_model.post_layernorm.weight"
    assert gemma.vllm_weight_name("model.language_model.norm.weight") == "model.language_model.norm.weight"
    qwen = FAMILIES[0]
    assert qwen.vllm_weight_name("model.vision_tower.x") == "model.vision_tower.x"


@pytest.mark.parametrize("arch", ARCHS)
def test_expansion_round_trips_beside_any_neighbour(arch, models):
    """Images side by side, at the start and end of a turn, and after newlines (Gemma 3's "\\n\\n" around each
    image joins them): the processor's ids, un-expanded, are the template's, and expand back."""
    processor = load_processor(models(arch))
    tokens = ImageTokens(processor, AutoConfig.from_pretrained(models(arch)))
    images = [random_image(0), random_image(1, size=96).resize((96, 48))]
    n = 1 if arch == "llava_onevision" else 2
    for parts in ([{"type": "image"}] * n,
                  [{"type": "text", "text": "Look:\n"}, *[{"type": "image"}] * n, {"type": "text", "text": "\n\nWhich?"}],
                  [{"type": "image"}, {"type": "text", "text": "\n"}] * n):
        messages = [{"role": "user", "content": parts}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        expanded = processor(text=[text], images=[images[:n]], add_special_tokens=False)["input_ids"][0]
        template = template_ids(processor.tokenizer, messages)
        sizes = [image.size for image in images[:n]]
        assert tokens.unexpand(list(expanded), sizes) == template
        assert tokens.expand(template, sizes) == list(expanded)


@pytest.mark.vllm
def test_the_family_table_agrees_with_vllm_on_lora(models):
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for arch in ARCHS:
        config = AutoConfig.from_pretrained(models(arch))
        cls = ModelRegistry.models[config.architectures[0]].load_model_cls()
        assert supports_lora(cls) == family_of(config).vllm_lora, arch



@pytest.mark.parametrize("arch", ["idefics3", "internvl"])  # untied and tied LM heads
def test_the_trainers_forward_leaves_out_the_tokens_the_server_never_samples(arch, models):
    """Server mode's policy is the server's: its logprobs are over the vocabulary less every image token (39
    of the tiny Idefics3's 482), so the trainer's are too, through TRL's fused LM head (the loss's) as through
    the model's own forward, with nothing saved or pushed changed (trainer_client/sampler.py)."""
    from trl.trainer import add_fused_lm_head

    from trainer_client.sampler import sampled_vocabulary_only

    served = Served(arch, "transformers", models(arch), server=None)
    model, never = served.model, served.tokens.never_sampled
    names, saved = [n for n, _ in model.named_parameters()], set(model.state_dict())
    inputs = processor_inputs(served, *chats(arch)[0])
    with torch.inference_mode():
        full = model(**inputs).logits[0, -1].log_softmax(-1)
    kept = torch.ones_like(full, dtype=torch.bool)
    kept[never] = False
    expected = full.masked_fill(~kept, float("-inf")).log_softmax(-1)
    target = int(kept.nonzero()[0])

    sampled_vocabulary_only(model, never)
    add_fused_lm_head(model, temperature=1.0)
    ids = torch.cat([inputs["input_ids"], torch.tensor([[target]])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[0, -1] = target
    with torch.inference_mode():
        own = model(**inputs).logits[0, -1].log_softmax(-1)
        fused = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=labels,
                      fused_lm_head=True).log_probs[0, -1]
    assert torch.allclose(own[kept], expected[kept], atol=1e-5) and own[never].max() < -1e3
    assert fused.item() == pytest.approx(expected[target].item(), abs=1e-5)
    assert expected[target] - full[target] > 1e-3  # the mass left out is not rounding
    assert [n for n, _ in model.named_parameters()] == names and set(model.state_dict()) == saved


def test_an_lm_head_with_a_bias_of_its_own_is_refused_not_overwritten():
    from trainer_client.sampler import sampled_vocabulary_only

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 8, bias=True)

        def get_output_embeddings(self):
            return self.lm_head

    model = Head()
    with pytest.raises(ValueError, match="Head's LM head has a bias"):
        sampled_vocabulary_only(model, [1, 2])
    assert isinstance(model.lm_head.bias, torch.nn.Parameter)
