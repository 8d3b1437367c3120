"""The wire contract, the client's pure helpers, the image cache, and the layering rule."""

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from protocol import GeneratePrompt, GenerateRequest, ImageRef, SamplingParams, VideoRef
from protocol.schemas import MAX_VIDEO_FPS
from server.images import ImageCache, ImageError, decode_image
from tests.utils import png_bytes, random_image
from trainer_client import collapse_image_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,value", [("n", 0), ("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
                                         # each of these reached an engine once and came back as a 500
                                         ("repetition_penalty", 5e-324), ("repetition_penalty", float("inf")),
                                         ("temperature", 1e-300), ("temperature", 2.5), ("temperature", float("nan")),
                                         ("seed", -1), ("seed", 2**64), ("top_k", 2**31), ("max_tokens", 2**31)])
def test_sampling_params_reject_out_of_range(field, value):
    with pytest.raises(ValidationError) as err:
        SamplingParams(**{field: value})
    assert err.value.errors()[0]["loc"] == (field,)


def test_stop_strings_are_bounded_in_count_and_length():
    SamplingParams(stop=["x" * 256] * 16)
    for stop in ([""], ["x" * 257], ["x"] * 17):
        with pytest.raises(ValidationError) as err:
            SamplingParams(stop=stop)
        assert err.value.errors()[0]["loc"][0] == "stop"


def test_unknown_fields_are_rejected_not_ignored():
    with pytest.raises(ValidationError, match="max_token"):
        SamplingParams(max_token=5)


def test_prompt_needs_exactly_one_of_ids_or_messages():
    with pytest.raises(ValidationError):
        GeneratePrompt()
    with pytest.raises(ValidationError):
        GeneratePrompt(prompt_ids=[1], messages=[{"role": "user", "content": "hi"}])
    assert GeneratePrompt(prompt_ids=[1, 2]).prompt_ids == [1, 2]
    with pytest.raises(ValidationError):
        ImageRef(sha256="a" * 64, data="eA==")
    with pytest.raises(ValidationError):
        ImageRef(sha256="not-a-hash")
    with pytest.raises(ValidationError):
        GenerateRequest(prompts=[])


@pytest.mark.parametrize("fps", [0, -1.0, float("inf"), float("nan"), MAX_VIDEO_FPS * 2])
def test_a_videos_rate_is_positive_finite_and_bounded(fps):
    frames = [{"sha256": "a" * 64}]
    assert VideoRef(frames=frames, fps=2.5).fps == 2.5 and VideoRef(frames=frames).fps is None
    with pytest.raises(ValidationError) as err:
        GeneratePrompt(prompt_ids=[1], videos=[{"frames": frames, "fps": fps}])
    assert err.value.errors()[0]["loc"] == ("videos", 0, "fps")


def test_one_request_holds_a_bounded_number_of_sequences():
    from protocol import MAX_SEQUENCES_PER_REQUEST

    n = 512
    fits = MAX_SEQUENCES_PER_REQUEST // n
    GenerateRequest(prompts=[{"prompt_ids": [1]}] * fits, sampling={"n": n})
    with pytest.raises(ValidationError, match="split the batch"):
        GenerateRequest(prompts=[{"prompt_ids": [1]}] * (fits + 1), sampling={"n": n})


def test_collapse_image_runs_leaves_one_placeholder_per_image():
    pad = 7
    assert collapse_image_runs([1, 9, pad, pad, pad, 10, 2, 9, pad, pad, 10], pad) == [1, 9, pad, 10, 2, 9, pad, 10]
    assert collapse_image_runs([1, 2, 3], pad) == [1, 2, 3]


def test_image_cache_is_bounded_lru():
    img = random_image(0, 32)  # 32*32*4 = 4096 bytes decoded (Pillow's RGB is 4 bytes a pixel)
    cache = ImageCache(max_bytes=4096 * 2)
    for k in "abc":
        cache.put(k * 64, img)
    assert ("a" * 64) not in cache and ("b" * 64) in cache and ("c" * 64) in cache
    cache.get("b" * 64)  # touch b: c is now the oldest
    cache.put("d" * 64, img)
    assert ("b" * 64) in cache and ("c" * 64) not in cache
    assert cache.bytes == 4096 * 2


def test_decode_image_bounds_bytes_and_pixels_before_decoding():
    data = png_bytes(random_image(1, 64))
    assert decode_image(data, "img", max_bytes=10**6, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageError, match="--max-image-bytes") as e:
        decode_image(data, "img", max_bytes=100, max_pixels=10**6)
    assert e.value.status == 413
    with pytest.raises(ImageError, match="--max-pixels"):
        decode_image(data, "img", max_bytes=10**6, max_pixels=64 * 63)
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_image(b"GIF89a-but-not-really", "img", max_bytes=10**6, max_pixels=10**6)


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


OURS = {"protocol", "runtime", "server", "trainer_client", "examples"}


def test_the_floors_import_only_downwards():
    """protocol (the wire) < runtime (the machine, the libraries) < server | trainer_client < examples:
    each package imports only from floors below it, and the two sides never import each other."""
    below = {"protocol": set(), "runtime": {"protocol"}, "server": {"protocol", "runtime"},
             "trainer_client": {"protocol", "runtime"}, "examples": OURS - {"examples"}}
    for package, allowed in below.items():
        ours = (_imports(package) & OURS) - {package}
        assert ours <= allowed, f"{package} imports {sorted(ours - allowed)}"
    allowed = {"pydantic", "protocol", "hashlib", "typing", "enum", "__future__", "collections", "dataclasses", "re",
               "struct", "math"}
    assert _imports("protocol") <= allowed, _imports("protocol") - allowed
