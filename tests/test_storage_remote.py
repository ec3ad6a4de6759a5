"""prime_ckpt.storage on remote paths: ``memory://`` (fsspec's in-process file system) and
``s3://`` on a moto server, through the same functions the local tests exercise."""

from __future__ import annotations

import io
import pickle
import uuid
from pathlib import Path

import pytest

from prime_ckpt.dcp_io import dcp_reader, dcp_writer
from prime_ckpt.dcp_metadata import MetadataError, UnsafeMetadataError, read_dcp_metadata
from prime_ckpt.layout import scan_checkpoints, scan_inventory
from prime_ckpt.storage import (
    atomic_write,
    atomic_write_bytes,
    clean_leftovers,
    is_remote,
    list_tree,
    remove_tree,
    set_aside,
    to_path,
    tree_size,
)
from tests.marks import EMPTY_METADATA


@pytest.fixture(params=["memory", "s3"])
def root(request):
    """A fresh, empty remote directory: ``memory://...`` or ``s3://<bucket>/run`` on moto."""
    if request.param == "memory":
        path = to_path(f"memory://prime-ckpt-test-{uuid.uuid4().hex}")
        yield path
        remove_tree(path)
    else:
        s3 = request.getfixturevalue("s3_bucket")
        yield to_path(s3.url, s3.storage_options)


def names(root) -> list[str]:
    """Every file under ``root``, relative, sorted."""
    return sorted(rel for rel, kind in list_tree(root).items() if kind == "file")


def make_step(root, step: int, *, weights: bool = False):
    """A complete ``checkpoints/step_<N>`` (trainer + orchestrator) or ``weights/step_<N>``."""
    if weights:
        d = root / "weights" / f"step_{step}"
        for name, data in (("model.safetensors", b"m" * 10), ("config.json", b"{}"), ("manifest.json", b"{}"), ("COMPLETE", b"")):
            atomic_write_bytes(d / name, data)
        return d
    import torch

    buf = io.BytesIO()
    torch.save({"step": step}, buf)
    d = root / "checkpoints" / f"step_{step}"
    for name, data in (("trainer/__0_0.distcp", b"a" * 100), ("trainer/__1_0.distcp", b"b" * 50), ("trainer/.metadata", EMPTY_METADATA),
                       ("orchestrator.pt", buf.getvalue()), ("manifest.json", b"{}")):
        atomic_write_bytes(d / name, data)
    return d


# -- paths ------------------------------------------------------------------------------------
def test_to_path_and_is_remote(tmp_path):
    assert to_path(str(tmp_path)) == tmp_path and type(to_path(str(tmp_path))) is type(tmp_path)
    assert to_path(f"file://{tmp_path}/run") == tmp_path / "run" and isinstance(to_path(f"file://{tmp_path}"), Path)
    assert not is_remote(tmp_path) and not is_remote(str(tmp_path)) and not is_remote(f"file://{tmp_path}")
    p = to_path("memory://bkt/run", {"skip_instance_cache": False})
    assert is_remote(p) and is_remote("s3://bkt/run") and is_remote("gs://bkt/run")
    assert str(p) == "memory://bkt/run" and str(p / "checkpoints") == "memory://bkt/run/checkpoints"
    assert p.storage_options == {"use_listings_cache": False, "skip_instance_cache": False}  # listings never cached
    assert to_path(p) is p
    s3 = to_path("s3://bkt/run", {"key": "AKIA-SECRET", "secret": "hunter2"})
    assert "hunter2" not in repr(s3) + str(s3) + repr(s3 / "x") and "AKIA" not in repr(s3)
    assert to_path("s3://bkt/run", {"use_listings_cache": True}).storage_options["use_listings_cache"] is True


# -- writes -----------------------------------------------------------------------------------
def test_atomic_write_replaces_and_leaves_nothing_else(root):
    p = root / "a" / "b.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert names(root) == ["a/b.bin"]  # one object, no temp objects
    atomic_write_bytes(root / "empty", b"")
    assert (root / "empty").is_file() and (root / "empty").read_bytes() == b""


def test_atomic_write_error_uploads_nothing(root):
    p = root / "b.bin"
    atomic_write_bytes(p, b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    with pytest.raises(RuntimeError):
        atomic_write(root / "new.bin", boom)
    assert p.read_bytes() == b"old" and names(root) == ["b.bin"]


# -- deletes ----------------------------------------------------------------------------------
def test_remove_tree_and_tree_size(root):
    d = make_step(root, 3)
    assert tree_size(d) == 100 + 50 + len(EMPTY_METADATA) + len((d / "orchestrator.pt").read_bytes()) + 2
    assert tree_size(root / "nothing") == 0
    assert remove_tree(d) is True
    assert names(root) == [] and not d.exists()
    assert remove_tree(d) is False  # already gone is not an error
    f = root / "f"
    atomic_write_bytes(f, b"x")
    assert remove_tree(f) is True and not f.exists() and remove_tree(f) is False


def test_remove_tree_deletes_completion_marks_first(root, monkeypatch):
    """A crash right after the marks are gone (the bulk delete of the rest raises) leaves a
    visibly incomplete step, and the marks went in order: ``.metadata`` first."""
    step = make_step(root, 5)
    weights = make_step(root, 5, weights=True)
    fs = root.fs
    deleted: list[str] = []
    real_rm_file = fs.rm_file

    def rm_file(path, *a, **kw):
        deleted.append(path.rsplit("/", 1)[1])
        return real_rm_file(path, *a, **kw)

    def crash(*a, **kw):
        raise RuntimeError("killed mid-delete")

    monkeypatch.setattr(fs, "rm_file", rm_file)
    monkeypatch.setattr(fs, "rm", crash)
    with pytest.raises(OSError, match="killed mid-delete"):  # a backend error surfaces as OSError naming the path
        remove_tree(step)
    with pytest.raises(OSError):
        remove_tree(weights)
    assert deleted == [".metadata", "orchestrator.pt", "manifest.json", "COMPLETE", "manifest.json"]
    left = names(root)
    assert "checkpoints/step_5/trainer/__0_0.distcp" in left and "weights/step_5/model.safetensors" in left
    inv = scan_inventory(root)
    assert [(c.step, c.parts) for c in inv.checkpoints] == [(5, {"trainer": False, "orchestrator": False})]
    assert [(w.step, w.complete) for w in inv.weights] == [(5, False)]
    monkeypatch.undo()
    assert remove_tree(step) and remove_tree(weights) and names(root) == []


def test_inventory_on_remote(root):
    make_step(root, 10)
    make_step(root, 9)
    atomic_write_bytes(root / "checkpoints" / "step_11" / "trainer" / "__0_0.distcp", b"x")  # no .metadata yet
    atomic_write_bytes(root / "checkpoints" / "step_010" / "trainer" / ".metadata", b"x")  # not ours
    atomic_write_bytes(root / "checkpoints" / "notes.txt", b"x")
    make_step(root, 9, weights=True)
    atomic_write_bytes(root / "weights" / "step_10" / "model.safetensors", b"x")
    inv = scan_inventory(str(root) if root.protocol == "memory" else root)
    assert [(c.step, c.complete(), c.present) for c in inv.checkpoints] == [
        (9, True, ("trainer", "orchestrator")), (10, True, ("trainer", "orchestrator")), (11, False, ("trainer",)),
    ]
    assert [(w.step, w.complete) for w in inv.weights] == [(9, True), (10, False)]
    assert str(inv.checkpoints[0].path) == f"{root}/checkpoints/step_9"
    assert scan_checkpoints(root / "elsewhere") == []


def test_clean_leftovers_and_set_aside(root):
    make_step(root, 4)
    make_step(root, 6)
    assert clean_leftovers(root / "checkpoints") == []  # no temp files or renames on object storage
    into = root / "checkpoints" / ".superseded-1"
    moved = set_aside([root / "checkpoints" / "step_6"], into)
    assert [str(m) for m in moved] == [f"{into}/step_6"]
    assert [c.step for c in scan_checkpoints(root)] == [4]
    assert (into / "step_6" / "trainer" / ".metadata").read_bytes() == EMPTY_METADATA
    assert tree_size(into) == tree_size(root / "checkpoints" / "step_4")


# -- DCP ------------------------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_trainer_metadata_is_read_safely(root, capsys):
    import torch
    import torch.distributed.checkpoint as dcp

    d = root / "checkpoints" / "step_1" / "trainer"
    with pytest.raises(MetadataError, match="missing"):
        read_dcp_metadata(d)
    sd = {"w": torch.arange(12.0).reshape(3, 4), "n": 5}
    dcp.save(sd, storage_writer=dcp_writer(d))
    md = read_dcp_metadata(d)
    assert set(md.state_dict_metadata) == {"w", "n"}
    out = {"w": torch.zeros(3, 4), "n": 0}
    dcp.load(out, storage_reader=dcp_reader(d))
    assert torch.equal(out["w"], sd["w"]) and out["n"] == 5
    assert {".metadata", "__0_0.distcp"} <= {n.rsplit("/", 1)[-1] for n in names(d)}

    buf = io.BytesIO()
    pickle.dump(Evil(), buf)
    atomic_write_bytes(d / ".metadata", buf.getvalue())
    with pytest.raises(UnsafeMetadataError, match=r"builtins\.print"):
        read_dcp_metadata(d)
    with pytest.raises(BaseException, match="refused to load: references builtins.print"):  # DCP's CheckpointException
        dcp.load(out, storage_reader=dcp_reader(d))
    assert "pwned" not in capsys.readouterr().out
    atomic_write_bytes(d / ".metadata", b"\x80\x04 truncated")
    with pytest.raises(MetadataError, match="not readable DCP metadata"):
        read_dcp_metadata(d)


def test_remote_load_reads_tensors_directly_and_bitwise(root):
    """``dcp_reader`` on a remote path takes the direct read path for plain tensors (head, data,
    then tail, in file order, instead of torch.load on a slice of the remote file) and loads bitwise what was
    saved; a non-contiguous saved tensor still goes through DCP's own path."""
    import torch
    import torch.distributed.checkpoint as dcp

    from prime_ckpt.loading import DirectReadMixin

    g = torch.Generator().manual_seed(3)
    d = root / "checkpoints" / "step_2" / "trainer"
    sd = {"w": torch.randn(64, 33, generator=g), "h": torch.randn(7, generator=g).to(torch.bfloat16),
          "i": torch.arange(5), "t": torch.randn(4, 6, generator=g).t(), "n": 3}
    dcp.save(sd, storage_writer=dcp_writer(d), no_dist=True)
    reader = dcp_reader(d)
    out = {"w": torch.zeros(64, 33), "h": torch.zeros(7, dtype=torch.bfloat16), "i": torch.zeros(5, dtype=torch.int64),
           "t": torch.zeros(6, 4), "n": 0}
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert isinstance(reader, DirectReadMixin)
    assert (reader.direct_items, reader.fallback_items) == (3, 2)  # "t" was saved with its strides; "n" is bytes
    for k in ("w", "h", "i", "t"):
        assert out[k].dtype == sd[k].dtype and out[k].view(-1).view(torch.uint8).equal(sd[k].contiguous().view(-1).view(torch.uint8)), k
    assert out["n"] == 3
