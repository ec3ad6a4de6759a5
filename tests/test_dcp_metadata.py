"""prime_ckpt.dcp_metadata: real DCP metadata reads back; crafted or broken files are refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from prime_ckpt.dcp_metadata import (
    ALLOWED_GLOBALS,
    MetadataError,
    UnsafeMetadataError,
    read_dcp_metadata,
)


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


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "nested", "dotted", "torch.load", "non-dataclass DCP class"])
def test_malicious_metadata_is_refused_and_not_executed(tmp_path, real_dcp, kind):
    marker = tmp_path / "pwned"
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(_payloads(marker, real_dcp)[kind])
    with pytest.raises(UnsafeMetadataError) as info:
        read_dcp_metadata(trainer)
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


def test_refused_global_is_named(tmp_path, real_dcp):
    trainer = tmp_path / "t"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(pickle.dumps(_Exec("pass")))
    with pytest.raises(UnsafeMetadataError, match=r"builtins\.exec"):
        read_dcp_metadata(trainer)


def test_truncated_metadata(tmp_path, real_dcp):
    data = (real_dcp / ".metadata").read_bytes()
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(MetadataError) as info:
        read_dcp_metadata(trainer)
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
def test_not_metadata(tmp_path, content, words):
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / ".metadata").write_bytes(content)
    with pytest.raises(MetadataError, match=words) as info:
        read_dcp_metadata(trainer)
    assert str(trainer / ".metadata") in str(info.value)


def test_missing_metadata(tmp_path):
    with pytest.raises(MetadataError, match="missing") as info:
        read_dcp_metadata(tmp_path)
    assert str(tmp_path / ".metadata") in str(info.value)
