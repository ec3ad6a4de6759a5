"""The Hugging Face weights files written a tensor at a time (prime_ckpt.hf_writer): published
names, a streamed safetensors file read back by ``safetensors.safe_open``, and the commit of a
weights directory (index, small files, manifest, COMPLETE)."""

from __future__ import annotations

import json

import torch
import xxhash
from safetensors import safe_open

from prime_ckpt.hf_writer import TensorSpec, _bytes_of, commit_weights_dir, hf_files, published_tensors, safetensors_header
from prime_ckpt.layout import MANIFEST_FILE, SAFETENSORS_INDEX_FILE, WEIGHTS_MARKER, weights_complete
from prime_ckpt.manifest import verify_path


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight


def test_published_tensors_strip_wrappers_and_keep_tied_weights_once():
    outer = torch.nn.Module()
    outer._orig_mod = Tied()  # what torch.compile wraps a model in
    got = published_tensors(outer)
    assert [n for n, _ in got] == ["emb.weight"]
    assert got[0][1] is outer._orig_mod.emb.weight


def test_bytes_of_is_a_zero_copy_view_of_any_dtype():
    t = torch.arange(6, dtype=torch.bfloat16)
    assert bytes(_bytes_of(t)) == t.view(torch.uint8).numpy().tobytes()
    assert bytes(_bytes_of(torch.empty(0))) == b""


def write_shard(path, tensors: dict[str, torch.Tensor]) -> dict:
    specs = [TensorSpec(n, tuple(t.shape), t.dtype, owner=0) for n, t in tensors.items()]
    data = safetensors_header(specs) + b"".join(bytes(_bytes_of(t.contiguous())) for t in tensors.values())
    path.write_bytes(data)
    return {"path": path.name, "size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data), "tensors": list(tensors)}, specs


def test_commit_makes_a_complete_verified_directory_safe_open_reads(tmp_path):
    tmp_path = tmp_path / "weights" / "step_3"
    tmp_path.mkdir(parents=True)
    tensors = {"a.weight": torch.randn(3, 2).to(torch.bfloat16), "b.bias": torch.arange(5, dtype=torch.int64)}
    entry, specs = write_shard(tmp_path / "model-00001-of-00001.safetensors", tensors)
    files = hf_files(torch.nn.Linear(2, 2), None, {"hidden": 2}, None)
    assert files == {"config.json": json.dumps({"hidden": 2}, indent=2, sort_keys=True).encode()}

    commit_weights_dir(tmp_path, specs, [entry], files)

    assert (tmp_path / WEIGHTS_MARKER).exists() and (tmp_path / MANIFEST_FILE).exists() and weights_complete(tmp_path)
    index = json.loads((tmp_path / SAFETENSORS_INDEX_FILE).read_text())
    assert index == {"metadata": {"total_size": 3 * 2 * 2 + 5 * 8},
                     "weight_map": {"a.weight": entry["path"], "b.bias": entry["path"]}}
    assert json.loads((tmp_path / "config.json").read_text()) == {"hidden": 2}
    assert [r.status for r in verify_path(tmp_path)] == ["ok"]
    with safe_open(str(tmp_path / entry["path"]), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
