"""prime_ckpt.dcp_metadata: real DCP metadata reads back (into torch's classes or the torch-free
stand-ins, alike); crafted or broken files are refused in both modes."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path, PurePath

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from prime_ckpt import dcp_metadata, dcp_standins
from prime_ckpt.dcp_metadata import (
    ALLOWED_GLOBALS,
    DTYPES,
    LAYOUTS,
    MEMORY_FORMATS,
    MetadataError,
    UnsafeMetadataError,
    is_bytes_entry,
    is_tensor_entry,
    read_dcp_metadata,
)
from prime_ckpt.inspection import describe_trainer_part

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def real_dcp(tmp_path_factory) -> Path:
    """A real single-process ``dcp.save`` with several dtypes and non-tensor values."""
    path = tmp_path_factory.mktemp("dcp") / "trainer"
    sd = {
        "w": torch.randn(4, 3),
        "h": torch.ones(5, dtype=torch.bfloat16),
        "n": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b": torch.zeros(2, dtype=torch.uint8),
        "meta": {"step": 7, "name": "x", "lrs": [0.1, 0.2]},
    }
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(sd, checkpoint_id=str(path))
    return path


def _globals_of(path: Path) -> set[tuple[str, str]]:
    """The (module, name) globals a pickle we wrote ourselves references (plain unpickler)."""
    found: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recorder(f).load()
    return found


def test_round_trip_matches_dcp_reader(real_dcp):
    ours = read_dcp_metadata(real_dcp)
    theirs = FileSystemReader(str(real_dcp)).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data
    assert ours.planner_data == theirs.planner_data
    md = ours.state_dict_metadata
    assert list(md["w"].size) == [4, 3] and md["w"].properties.dtype == torch.float32
    assert md["h"].properties.dtype == torch.bfloat16
    assert md["n"].properties.dtype == torch.int64 and md["b"].properties.dtype == torch.uint8
    assert type(md["meta.step"]).__name__ == "BytesStorageMetadata"
    # the .metadata file itself is accepted too
    assert read_dcp_metadata(real_dcp / ".metadata").state_dict_metadata == md


def test_real_file_uses_only_allowed_globals(real_dcp):
    refs = _globals_of(real_dcp / ".metadata")
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in refs
    for module, name in refs:
        is_dtype = module == "torch" and isinstance(getattr(torch, name), torch.dtype)
        assert (module, name) in ALLOWED_GLOBALS or is_dtype, (module, name)


class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


def _payloads(marker: Path, real_dcp: Path) -> dict[str, bytes]:
    nested = FileSystemReader(str(real_dcp)).read_metadata()
    nested.planner_data = {"x": _System(f"touch {marker}")}  # malicious object inside real metadata
    return {
        "os.system": pickle.dumps(_System(f"touch {marker}")),
        "builtins.exec": pickle.dumps(_Exec(f"open({str(marker)!r}, 'w').close()")),
        "nested": pickle.dumps(nested),
        # protocol-0 GLOBAL with a dotted name: getattr chain through an allowed module
        "dotted": (
            b"ctorch.distributed.checkpoint.metadata\nos.system\n(V" + f"touch {marker}".encode() + b"\ntR."
        ),
        "torch.load": pickle.dumps(torch.load),
        "non-dataclass DCP class": pickle.dumps(FileSystemReader),
    }


@pytest.mark.parametrize("torch_free", [False, True], ids=["torch", "torch-free"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "nested", "dotted", "torch.load", "non-dataclass DCP class"])
def test_malicious_metadata_is_refused_and_not_executed(tmp_path, real_dcp, kind, torch_free):
    marker = tmp_path / "pwned"
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(_payloads(marker, real_dcp)[kind])
    with pytest.raises(UnsafeMetadataError) as info:
        read_dcp_metadata(trainer, torch_free=torch_free)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MetadataError)
    msg = str(info.value)
    assert str(trainer / ".metadata") in msg and "\n" not in msg
    assert "nothing was executed" in msg
    assert not marker.exists()


def test_malicious_payload_is_live(tmp_path, real_dcp):
    """Control: the os.system payload really runs under plain pickle (so the test above means
    something)."""
    marker = tmp_path / "pwned"
    pickle.loads(_payloads(marker, real_dcp)["os.system"])
    assert marker.exists()


@pytest.mark.parametrize("torch_free", [False, True], ids=["torch", "torch-free"])
def test_refused_global_is_named(tmp_path, real_dcp, torch_free):
    trainer = tmp_path / "t"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(pickle.dumps(_Exec("pass")))
    with pytest.raises(UnsafeMetadataError, match=r"builtins\.exec"):
        read_dcp_metadata(trainer, torch_free=torch_free)


@pytest.mark.parametrize("torch_free", [False, True], ids=["torch", "torch-free"])
def test_truncated_metadata(tmp_path, real_dcp, torch_free):
    data = (real_dcp / ".metadata").read_bytes()
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(MetadataError) as info:
        read_dcp_metadata(trainer, torch_free=torch_free)
    assert not isinstance(info.value, UnsafeMetadataError)
    assert str(trainer / ".metadata") in str(info.value) and "truncated" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"this is not a pickle\n" * 4, "not a pickle"),
        (b"", "empty"),
        (pickle.dumps({"step": 1}), "not DCP metadata"),
    ],
)
@pytest.mark.parametrize("torch_free", [False, True], ids=["torch", "torch-free"])
def test_not_metadata(tmp_path, content, words, torch_free):
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(content)
    with pytest.raises(MetadataError, match=words) as info:
        read_dcp_metadata(trainer, torch_free=torch_free)
    assert str(trainer / ".metadata") in str(info.value)


def test_missing_metadata(tmp_path):
    with pytest.raises(MetadataError, match="missing") as info:
        read_dcp_metadata(tmp_path)
    assert str(tmp_path / ".metadata") in str(info.value)


# -- torch-free stand-ins ---------------------------------------------------------------------
def _plain(x):
    """A comparable, hashable form of DCP metadata built from either torch's classes or the
    stand-ins: class names, field values, sizes as int tuples, dtypes/layouts as "torch.<name>"."""
    if isinstance(x, (torch.dtype, torch.layout, torch.memory_format, dcp_metadata.DType, dcp_metadata.Layout, dcp_metadata.MemoryFormat)):
        return ("torch", str(x))
    if isinstance(x, enum.Enum):
        return ("enum", x.name, x.value)
    if isinstance(x, tuple) and type(x).__name__ == "Size":
        return ("Size", tuple(int(i) for i in x))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, _plain(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, dict):
        return ("dict", tuple((_plain(k), _plain(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_plain(v) for v in x))
    if isinstance(x, PurePath):
        return ("path", str(x))
    assert x is None or isinstance(x, (int, float, str, bytes)), type(x)
    return x


def test_torch_free_reads_the_same_metadata(real_dcp):
    ours = read_dcp_metadata(real_dcp, torch_free=True)
    theirs = read_dcp_metadata(real_dcp, torch_free=False)
    assert type(ours) is dcp_metadata.Metadata
    assert type(theirs).__module__ == "torch.distributed.checkpoint.metadata"
    assert _plain(ours) == _plain(theirs)
    md = ours.state_dict_metadata
    assert md["w"].size == (4, 3) and md["w"].properties.dtype is DTYPES["float32"]
    assert str(md["h"].properties.dtype) == "torch.bfloat16" and md["h"].properties.dtype.itemsize == 2
    assert [(c.offsets, c.sizes) for c in md["n"].chunks] == [((0, 0), (2, 3))]
    assert is_tensor_entry(md["w"]) and is_bytes_entry(md["meta.step"]) and not is_tensor_entry(md["meta.step"])
    assert is_tensor_entry(theirs.state_dict_metadata["w"]) and is_bytes_entry(theirs.state_dict_metadata["meta.step"])
    # storage_data is keyed by MetadataIndex, hashed and compared like DCP's (index ignored)
    key = next(k for k in ours.storage_data if k.fqn == "meta.step")
    assert ours.storage_data[dcp_metadata.MetadataIndex("meta.step", index=3)] is ours.storage_data[key]


def test_default_mode_follows_torch_import(real_dcp):
    """torch is imported in this process, so the default reads into torch's classes."""
    assert type(read_dcp_metadata(real_dcp)).__module__ == "torch.distributed.checkpoint.metadata"


@pytest.mark.parametrize("name_filter", [None, "app.model.*", "meta.*"])
def test_tensor_table_is_the_same_in_both_modes(real_dcp, monkeypatch, name_filter):
    from prime_ckpt import inspect_dcp

    def table(torch_free: bool):
        monkeypatch.setattr(inspect_dcp, "read_dcp_metadata", lambda d: read_dcp_metadata(d, torch_free=torch_free))
        return dataclasses.asdict(describe_trainer_part(real_dcp, name_filter))

    free, backed = table(True), table(False)
    assert free == backed
    if name_filter is None:
        rows = {t["name"]: (t["shape"], t["dtype"], t["bytes"], t["sharded"]) for t in free["tensors"]}
        assert rows == {
            "w": ([4, 3], "float32", 48, False), "h": ([5], "bfloat16", 10, False),
            "n": ([2, 3], "int64", 48, False), "b": ([2], "uint8", 2, False),
        }  # fmt: skip
        assert all(b["stored_bytes"] for b in free["non_tensors"])


def test_dtype_table_matches_torch():
    torch_dtypes = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}
    assert set(DTYPES) == set(torch_dtypes)
    for name, dtype in torch_dtypes.items():
        assert (str(DTYPES[name]), DTYPES[name].itemsize) == (str(dtype), dtype.itemsize), name
    assert set(LAYOUTS) == {k for k, v in vars(torch).items() if isinstance(v, torch.layout)}
    for layout in LAYOUTS.values():
        assert dcp_standins._get_layout(str(layout)) is layout
        assert torch.serialization._get_layout(str(layout)) is getattr(torch, layout.name)
    formats = {k: v for k, v in vars(torch).items() if isinstance(v, torch.memory_format)}
    assert {k: str(v) for k, v in MEMORY_FORMATS.items()} == {k: str(v) for k, v in formats.items()}


def test_stand_ins_cover_the_allow_list():
    """Every exact allow-listed global has a stand-in (or is the same stdlib object)."""
    for module, name in ALLOWED_GLOBALS:
        assert dcp_metadata._resolve_standin(module, name) is not None, (module, name)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_default_mode_is_torch_free_without_torch(real_dcp):
    proc = _python(
        "import sys\n"
        "from prime_ckpt.dcp_metadata import read_dcp_metadata\n"
        "md = read_dcp_metadata(sys.argv[1])\n"
        "print(type(md).__module__, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))",
        str(real_dcp),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["prime_ckpt.dcp_standins", "[]"]  # the stand-ins, no torch


def test_default_mode_retries_with_torch_for_a_dcp_type_without_stand_in(tmp_path, real_dcp):
    """A DCP dataclass torch mode admits but the torch-free mode does not know (as after a
    torch upgrade): the default mode reads it with torch, under torch mode's rules."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    md = FileSystemReader(str(real_dcp)).read_metadata()
    md.planner_data = {"x": WriteItem(index=MetadataIndex("a"), type=WriteItemType.BYTE_IO)}
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeMetadataError, match=r"WriteItem.*torch-free reader does not know.*nothing was executed"):
        read_dcp_metadata(trainer, torch_free=True)
    assert read_dcp_metadata(trainer, torch_free=False).planner_data["x"].type is WriteItemType.BYTE_IO
    proc = _python(
        "import sys\n"
        "from prime_ckpt.dcp_metadata import read_dcp_metadata\n"
        "md = read_dcp_metadata(sys.argv[1])\n"
        "print(type(md).__module__, type(md.planner_data['x']).__name__)",
        str(trainer),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch.distributed.checkpoint.metadata", "WriteItem"]


def test_safe_loaders_are_dcp_subclasses_defined_on_first_use():
    proc = _python("import sys, prime_ckpt.dcp_io as m; print('torch' in sys.modules)")
    assert proc.stdout.strip() == "False", proc.stderr
    from prime_ckpt import dcp_io
    from prime_ckpt.dcp_io import SafeFileSystemReader, SafeLoadPlanner

    assert issubclass(SafeFileSystemReader, dcp.FileSystemReader) and issubclass(SafeLoadPlanner, dcp.DefaultLoadPlanner)
    assert dcp_io.SafeFileSystemReader is SafeFileSystemReader
    assert pickle.loads(pickle.dumps(SafeLoadPlanner)) is SafeLoadPlanner
    with pytest.raises(AttributeError):
        dcp_io.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("torch_free", [True, False])
def test_metadata_saved_with_a_upath_checkpoint_id_is_read(tmp_path, torch_free):
    """dcp.save(..., checkpoint_id=UPath(...)) records the UPath in StorageMeta; it reads back as
    its text (PathRecord), and `inspect` shows the checkpoint (#16 item 3)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from typer.testing import CliRunner
    from upath import UPath

    from prime_ckpt.cli import app
    from prime_ckpt.dcp_metadata import PathRecord

    where = tmp_path / "ck"
    dcp.save({"w": torch.arange(3.0)}, checkpoint_id=UPath(str(where)), no_dist=True)
    md = read_dcp_metadata(where, torch_free=torch_free)
    assert list(md.state_dict_metadata) == ["w"]
    assert isinstance(md.storage_meta.checkpoint_id, PathRecord) and md.storage_meta.checkpoint_id == str(where)
    r = CliRunner().invoke(app, ["inspect", str(where), "--json"])
    assert r.exit_code == 0 and [t["name"] for t in json.loads(r.stdout)["trainer"]["tensors"]] == ["w"], r.output


def test_a_upath_global_runs_nothing(tmp_path):
    """A crafted pickle that calls a upath class with arguments gets a PathRecord: no file system,
    no code."""
    import pickle

    from prime_ckpt.dcp_metadata import PathRecord, decode_metadata

    class _Call:
        def __reduce__(self):
            import upath.implementations.local as local

            return (local.PosixUPath, ("/etc", "passwd"))

    data = pickle.dumps({"x": _Call()})
    with pytest.raises(MetadataError, match="not DCP metadata"):
        decode_metadata(data, tmp_path / ".metadata")
    assert PathRecord("/etc", "passwd") == "/etc/passwd"


def _as_torch_2_2(md):
    """``md`` as torch <= 2.2's DCP pickled it: ``TensorProperties`` (and its memory-format enum)
    from ``torch.distributed._shard.sharded_tensor.metadata``, no ``storage_meta`` / ``version``
    on ``Metadata``, no ``transform_descriptors`` on ``_StorageInfo`` (the fields those releases
    did not have; a dataclass pickles its ``__dict__``, so dropping them drops them from the file)."""
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties as Legacy

    for entry in md.state_dict_metadata.values():
        if is_tensor_entry(entry):
            p = entry.properties
            entry.properties = Legacy(p.dtype, p.layout, p.requires_grad, p.memory_format, p.pin_memory)
    for info in md.storage_data.values():
        info.__dict__.pop("transform_descriptors", None)
    md.__dict__.pop("storage_meta", None)
    md.__dict__.pop("version", None)
    return md


@pytest.mark.parametrize("torch_free", [True, False])
def test_metadata_from_torch_2_2_is_read(tmp_path, real_dcp, torch_free):
    """#16 item 3: a .metadata in torch <= 2.2's shape (which torch 2.13's own dcp.load still
    reads) is read by ours in both modes, and inspect / convert show the same tensors."""
    import shutil

    from typer.testing import CliRunner

    from prime_ckpt.cli import app

    old = tmp_path / "old"
    shutil.copytree(real_dcp, old)
    md = _as_torch_2_2(FileSystemReader(str(real_dcp)).read_metadata())
    (old / ".metadata").write_bytes(pickle.dumps(md))
    legacy = "torch.distributed._shard.sharded_tensor.metadata"
    assert {g for g in _globals_of(old / ".metadata") if g[0] == legacy} == {(legacy, "TensorProperties"), (legacy, "MEM_FORMAT_ENCODING")}

    # torch's own reader still loads it: the values are the reference
    ref = {"w": torch.empty(4, 3), "h": torch.empty(5, dtype=torch.bfloat16), "meta": {"step": 0, "name": "", "lrs": []}}
    dcp.load(ref, checkpoint_id=str(old), no_dist=True)

    ours = read_dcp_metadata(old, torch_free=torch_free)
    new = read_dcp_metadata(real_dcp, torch_free=torch_free)
    assert {k: (tuple(v.size), str(v.properties.dtype)) for k, v in ours.state_dict_metadata.items() if is_tensor_entry(v)} == {
        k: (tuple(v.size), str(v.properties.dtype)) for k, v in new.state_dict_metadata.items() if is_tensor_entry(v)
    }
    assert str(ours.state_dict_metadata["w"].properties.memory_format) == "torch.contiguous_format"
    r = CliRunner().invoke(app, ["inspect", str(old), "--json"])
    assert r.exit_code == 0, r.output
    assert {t["name"] for t in json.loads(r.stdout)["trainer"]["tensors"]} == {"w", "h", "n", "b"}
    r = CliRunner().invoke(app, ["convert", str(old), str(tmp_path / "old.pt"), "--to", "torch-save"])
    assert r.exit_code == 0, r.output
    out = torch.load(tmp_path / "old.pt", weights_only=True)
    assert torch.equal(out["w"], ref["w"]) and torch.equal(out["h"], ref["h"]) and out["meta"] == ref["meta"]
