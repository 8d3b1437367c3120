"""Weight staging (server/staging.py), the full-sync manifest check (server/manifest.py) and the
engine transfer steps, on their own; whole syncs against real servers are in test_weights.py."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protocol import ErrorCode, TensorSpec
from server.engines import TransferStep
from server.errors import WeightSyncError
from server.manifest import check_manifest, served_manifest
from server.routes.weights import ROUTE_STEPS
from server.staging import (
    STAGING_PREFIX,
    StagedWeights,
    StagingArea,
    claim,
    remove_dead_servers_files,
    staging_root,
)

# two buckets: a float32 [2, 3] (24 bytes) and an int64 [2] (16 bytes) in bucket 0, a float32 [4] in bucket 1
SPECS = [TensorSpec(name="a", dtype="float32", shape=[2, 3], bucket=0, offset=0),
         TensorSpec(name="b", dtype="int64", shape=[2], bucket=0, offset=24),
         TensorSpec(name="c", dtype="float32", shape=[4], bucket=1, offset=0)]
SIZES = [40, 16]


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


def _write(staged: StagedWeights, i: int, *parts: bytes) -> int:
    return asyncio.run(staged.write_bucket(i, _chunks(*parts)))


@pytest.fixture
def staged():
    staged = StagedWeights(SPECS, SIZES)
    yield staged
    staged.close()


def test_buckets_written_in_chunks_are_the_tensors(staged):
    a, b, c = torch.arange(6.0).view(2, 3), torch.tensor([7, -8]), torch.tensor([0.5, 1.5, 2.5, 3.5])
    first = a.numpy().tobytes() + b.numpy().tobytes()
    assert _write(staged, 0, first[:10], first[10:]) == 40
    assert _write(staged, 1, c.numpy().tobytes()) == 16
    got = dict(staged.tensors())
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and torch.equal(got["c"], c)
    assert staged.layout() == {"path": str(staged.path), "tensors": [["a", "float32", [2, 3], 0],
                                                                     ["b", "int64", [2], 24],
                                                                     ["c", "float32", [4], 40]]}
    assert staged.path.parent == staging_root() and staged.path.name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
    assert staged.path.stat().st_size == 56


def test_a_short_or_long_body_says_so_and_writes_nothing_past_its_bucket(staged):
    assert _write(staged, 1, b"\x01" * 10) == 10
    # one chunk past the bucket: counted, not written, and nothing after it is read
    assert _write(staged, 0, b"\x02" * 30, b"\x03" * 11, b"never read") == 41
    assert bytes(staged.bucket(0).numpy()) == b"\x02" * 30 + b"\x00" * 10
    assert bytes(staged.bucket(1).numpy()) == b"\x01" * 10 + b"\x00" * 6


def test_the_last_committed_file_is_staged_again_for_the_same_layout():
    area = StagingArea()
    first = area.stage(SPECS, SIZES)
    area.release(first, reuse=True)
    renamed = [s.model_copy(update={"name": s.name.upper()}) for s in SPECS]
    again = area.stage(renamed, SIZES)
    assert again is first and [name for name, _ in again.tensors()] == ["A", "B", "C"]
    area.release(again, reuse=True)
    other = area.stage(SPECS[:1], [24])  # another layout: a new file, and the spare is gone
    assert other is not first and not first.path.exists()
    area.release(other, reuse=False)  # aborted: nobody may reuse a file a writer may still fill
    assert not other.path.exists()
    assert area.stage(SPECS[:1], [24]) is not other
    kept = area.stage(SPECS, SIZES)
    area.release(kept, reuse=True)
    area.close()
    assert not kept.path.exists()


HOLDER = """
import sys
from pathlib import Path
from pathlib import Path
from server.staging import claim
fds = [claim(Path(p)) for p in sys.argv[1:]]
print("held", flush=True)
sys.stdin.read()
"""


def test_files_of_dead_servers_go_and_the_living_ones_stay(tmp_path):
    # A live server holds its files, whatever its pid: one in another container sharing this /dev/shm
    # (`ipc: host`) has a pid this process cannot see (999999 here), and its files must stay.
    held_elsewhere = [tmp_path / "p-999999-x.bin", tmp_path / "p-999999-lora"]
    held_here, unheld = tmp_path / f"p-{os.getpid()}-x.bin", tmp_path / f"p-{os.getpid()}-y.bin"
    for path in (held_elsewhere[0], held_here, unheld, tmp_path / "p-notapid.bin", tmp_path / "other-1.bin"):
        path.write_bytes(b"x")
    held_elsewhere[1].mkdir()
    (held_elsewhere[1] / "v1").write_bytes(b"x")
    dead_dir = tmp_path / "p-123-lora"
    dead_dir.mkdir()
    (dead_dir / "v1").write_bytes(b"x")
    ours = claim(held_here)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, held_elsewhere)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline() == "held\n"
        remove_dead_servers_files(tmp_path, "p-")
        assert {p.name for p in tmp_path.iterdir()} == {"p-999999-x.bin", "p-999999-lora", held_here.name, "other-1.bin"}
    finally:
        holder.communicate("")
        os.close(ours)
    remove_dead_servers_files(tmp_path, "p-")  # its holder gone, nothing of it stays
    assert {p.name for p in tmp_path.iterdir()} == {"other-1.bin"}


@pytest.fixture(scope="module")
def manifest(tiny_vlm):
    return served_manifest(str(tiny_vlm))


def _specs(accepted, required) -> list[TensorSpec]:
    return [TensorSpec(name=n, dtype=str(accepted[n][0]).removeprefix("torch."), shape=list(accepted[n][1]))
            for n in sorted(required)]


def _refused(tensors, manifest) -> WeightSyncError:
    with pytest.raises(WeightSyncError) as info:
        check_manifest(tensors, *manifest)
    assert (info.value.status, info.value.code) == (422, ErrorCode.invalid_request)
    return info.value


def test_a_full_manifest_passes_and_each_fault_is_named(manifest):
    accepted, required = manifest
    assert required <= set(accepted) and len(required) > 10
    specs = _specs(accepted, required)
    check_manifest(specs, *manifest)

    unknown = [*specs, TensorSpec(name="model.nope", dtype="float32", shape=[1])]
    err = _refused(unknown, manifest)
    assert err.detail == {"field": f"tensors[{len(specs)}].name"} and "'model.nope' is not a parameter" in err.message
    wrong = [specs[0].model_copy(update={"shape": [*specs[0].shape, 1]}), *specs[1:]]
    assert _refused(wrong, manifest).detail == {"field": "tensors[0].shape"}
    ints = [specs[0].model_copy(update={"dtype": "int32"}), *specs[1:]]
    assert _refused(ints, manifest).detail == {"field": "tensors[0].dtype"}
    err = _refused(specs[2:], manifest)
    assert err.detail == {"field": "tensors", "missing": sorted(required)[:2]}
    assert err.message.startswith(f"the manifest misses 2 of the model's {len(required)} parameters")


def test_transfer_steps_keep_their_wire_names():
    assert [s.value for s in TransferStep] == ["init", "start", "update", "finish", "abort"]
    assert TransferStep("start") is TransferStep.START and TransferStep.UPDATE == "update"
    # the trainer drives these three by name; finish and abort come with commit and abort
    assert [str(s) for s in ROUTE_STEPS] == ["init", "start", "update"]
