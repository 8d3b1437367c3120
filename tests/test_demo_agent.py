"""`make demo-agent` on its default seed: SFT on tool-use traces, GRPO with the zoom tool through
align-serve, then greedy accuracy on fresh images with the tool against the tool disabled."""

from PIL import Image

from examples.demo_agent import MAX_PIXELS, PAIRS, ZoomEnv, main, samples


def test_the_patch_is_grey_at_the_served_size_and_readable_zoomed():
    """Why the task needs the tool: at the processor's size every patch averages to one grey."""
    colour, region, image = samples(1, seed=3)[0]
    side = int(MAX_PIXELS ** 0.5)
    small = image.resize((side, side), Image.BICUBIC, reducing_gap=None)
    env = ZoomEnv()
    env.reset(image=image)
    zoomed = env.zoom(region)[0]["image"].resize((side, side), Image.BICUBIC)
    seen = {tuple(small.getpixel((side // 4 + dx, side // 4 + dy))) for dx in (-1, 0) for dy in (-1, 0)}
    # the top-left patch's inner pixels: within a few levels of grey (the light background bleeds in a
    # little), where its stripes are 0 and 255 in every channel
    assert all(max(abs(c - 128) for c in px) <= 8 for px in seen), seen
    assert any(px in PAIRS[colour] for px in zoomed.get_flattened_data())  # the stripes' own colours


def test_demo_agent_uses_its_tool(tmp_path, capsys):
    result = main(["--work-dir", str(tmp_path)])
    assert result["with_tool"] >= result["without"] + 0.20, result
    assert result["plot"].is_file()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"accuracy with tool: {result['with_tool']:.0%}, without: {result['without']:.0%}"
