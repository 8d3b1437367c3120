"""Qwen2-VL's and Qwen2.5-VL's M-RoPE positions as the models were trained with them and as vLLM computes
them, in place of transformers 5.17's for video.

transformers 5.17 places the text after a video at the video's start plus its larger spatial side, though
its frames' temporal positions run further (Qwen2.5-VL: 4 tokens a second, so 8 frames at 2 fps reach 12
past the start, a 112x84 frame's side 4): the text that follows overlaps the video's positions. It also
truncates Qwen2.5-VL's seconds per temporal patch to an integer before scaling (0.5 s at 4 fps becomes 0:
every frame at one instant). The reference (Qwen's own, and vLLM's `get_mrope_input_positions`) starts the
text after the highest position so far and scales each patch index by its seconds before truncating. Images
(one temporal patch) are placed alike by both; only videos move.

`install()` replaces the two models' `get_rope_index` (a transformers method, called with keywords by its
forward and `generate`), in every process that runs a Qwen-VL forward of ours: the transformers engine and
the trainer. tests/test_video_qwen25.py fails when transformers' own positions become the reference's, so
that this module goes then.
"""

import itertools

import torch


def _positions(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
               second_per_grid_ts=None, attention_mask=None, per_second: float | None = None):
    merge = self.config.vision_config.spatial_merge_size
    grids = {1: iter(image_grid_thw if image_grid_thw is not None else []),
             2: iter(video_grid_thw if video_grid_thw is not None else [])}
    seconds = iter(torch.as_tensor(second_per_grid_ts).tolist() if second_per_grid_ts is not None else [])
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    for b in range(input_ids.shape[0]):
        keep = (attention_mask[b].bool() if attention_mask is not None
                else torch.ones(input_ids.shape[1], dtype=torch.bool, device=input_ids.device))
        pieces, start = [], 0
        for kind, run in itertools.groupby(mm_token_type_ids[b][keep].tolist()):
            left = len(list(run))
            if kind == 0:
                pieces.append(torch.arange(left).expand(3, -1) + start)
                start += left
                continue
            while left > 0:  # one image or video after another, should two stand side by side
                t, h, w = (int(x) for x in next(grids[kind]))
                h, w = h // merge, w // merge
                frames = torch.arange(t)
                if kind == 2 and per_second is not None:
                    factor = next(seconds, 1.0) * per_second  # as vLLM: one float64 factor, truncated after
                    frames = (torch.arange(t, dtype=torch.float64) * factor).long()
                grid = torch.stack(torch.meshgrid(frames, torch.arange(h), torch.arange(w), indexing="ij"))
                pieces.append(grid.reshape(3, -1) + start)
                start = int(pieces[-1].max()) + 1
                left -= t * h * w
        positions = torch.cat(pieces, dim=1).to(position_ids.device)
        position_ids[:, b, keep] = positions
        deltas.append(int(positions.max()) + 1 - int(keep.sum()))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def qwen2_vl_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                        attention_mask=None, **kwargs):
    return _positions(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, None, attention_mask)


def qwen2_5_vl_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                          second_per_grid_ts=None, attention_mask=None, **kwargs):
    return _positions(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                      attention_mask, per_second=float(self.config.vision_config.tokens_per_second))


REPLACED: dict[type, object] = {}  # each patched model class: transformers' own get_rope_index


def install() -> None:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    for cls, ours in ((modeling_qwen2_vl.Qwen2VLModel, qwen2_vl_rope_index),
                      (modeling_qwen2_5_vl.Qwen2_5_VLModel, qwen2_5_vl_rope_index)):
        REPLACED.setdefault(cls, cls.get_rope_index)
        cls.get_rope_index = ours
