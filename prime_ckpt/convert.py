"""Tensor readers for checkpoints, and conversions between formats (``prime-ckpt convert``).

Readers (:func:`open_source`) give a name -> (shape, dtype) table from metadata alone and load
tensors on request, a few at a time:

* a DCP directory (``checkpoints/step_<N>`` or its ``trainer/``): the table is the ``.metadata``
  read through :func:`prime_ckpt.dcp_metadata.read_dcp_metadata`; tensors are loaded with DCP
  (sharded tensors come back whole) through :class:`~prime_ckpt.dcp_metadata.SafeFileSystemReader`
  and :class:`~prime_ckpt.dcp_metadata.SafeLoadPlanner`, so nothing is unpickled with full
  pickle;
* a weights step directory (``weights/step_<N>``) or a ``.safetensors`` file: the table is the
  safetensors header; tensors are read one by one.

``model_only=True`` restricts a DCP source to the model (``app.model.*``) with that prefix
stripped, which is how a DCP checkpoint lines up with a weights directory.

Conversions (each writes to a temp name beside the output and renames it into place; an
existing output is replaced only with ``force``; the input is only read; an output inside any
checkpoint or weights step, :func:`checkpoint_containing`, is refused even with ``force``):

* :func:`dcp_to_torch_save`: a DCP checkpoint -> one ``torch.save`` file holding the nested state
  dict (``{"app": {"model": ..., "optimizer": ..., ...}}``). Loads the whole state in memory.
* :func:`to_safetensors`: a DCP checkpoint or a weights dir -> ``model.safetensors`` with the
  model tensors only (names without ``app.model.``), optionally cast to another float dtype.
* :func:`torch_save_to_dcp`: a ``torch.save`` file (e.g. the seed's single-file ``trainer.pt``),
  read with ``weights_only=True`` -> a DCP directory. A state dict without a top-level ``"app"``
  key is stored under ``"app"`` so that its ``model``/``optimizer`` entries get the keys
  :class:`prime_ckpt.trainer.Checkpointer` uses (``app.model.*`` ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from prime_ckpt.dcp_io import SafeFileSystemReader, SafeLoadPlanner
from prime_ckpt.dcp_metadata import (
    UnsafeMetadataError,
    has_dcp_metadata,
    read_dcp_metadata,
)
from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.foreign import foreign_checkpoint_kind, rank_shard_info
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    DCP_METADATA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ORCHESTRATOR_FILE,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    parse_step,
)
from prime_ckpt.storage import atomic_write, fsync_dir, missing_reason, remove_tree, tmp_path_for

#: Prefix of the model's tensors in a trainer checkpoint (``Checkpointer``'s ``app`` key).
MODEL_PREFIX = "app.model."

#: ``--dtype`` names for :func:`to_safetensors`.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConvertError(PrimeCkptError, ValueError):
    """An input that cannot be read as asked, or an output that may not be written (one line,
    names the path)."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor, from metadata."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass
class TensorSource:
    """Tensors of one checkpoint: ``tensors`` (name -> info, from metadata) and ``load``.

    ``kind`` is ``"dcp"`` or ``"weights"``; ``non_tensors`` lists a DCP checkpoint's pickled
    values (empty for weights); ``prefix`` is the stripped name prefix (``model_only``).
    """

    kind: str
    path: Path
    tensors: dict[str, TensorInfo]
    non_tensors: list[str] = field(default_factory=list)
    prefix: str = ""
    _metadata: Metadata | None = None
    #: weights only: tensor name -> the safetensors file holding it (sharded weights dirs)
    files: dict[str, Path] = field(default_factory=dict)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors (CPU, full/unsharded, original dtype)."""
        names = list(names)
        if self.kind == "weights":
            from safetensors import safe_open

            out: dict[str, torch.Tensor] = {}
            by_file: dict[Path, list[str]] = {}
            for n in names:
                by_file.setdefault(self.files.get(n, self.path), []).append(n)
            for file, group in by_file.items():
                with safe_open(str(file), framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in group})
            return {n: out[n] for n in names}
        sd = {self.prefix + n: torch.empty(self.tensors[n].shape, dtype=self.tensors[n].dtype) for n in names}
        _dcp_load(self.path, self._metadata, sd, SafeLoadPlanner())
        return {n: sd[self.prefix + n] for n in names}

    def load_values(self, names: Iterable[str]) -> dict[str, Any]:
        """Load non-tensor (pickled) DCP entries, with ``weights_only=True``."""
        sd: dict[str, Any] = {self.prefix + n: None for n in names}
        if sd:
            _dcp_load(self.path, self._metadata, sd, SafeLoadPlanner())
        return {n: sd[self.prefix + n] for n in names}

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time (memory: one tensor at a time)."""
        for n in self.tensors if names is None else names:
            yield n, self.load([n])[n]


def _dcp_load(path: Path, metadata: Metadata | None, sd: dict[str, Any], planner: Any) -> None:
    """``_load_state_dict`` without a process group; a read failure becomes one
    :class:`ConvertError` naming the file (DCP wraps it in a multi-line ``CheckpointException``)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        _load_state_dict(sd, storage_reader=_CachedReader(path, metadata), planner=planner, no_dist=True)
    except CheckpointException as e:
        failures = list(getattr(e, "failures", {}).values())
        exc = failures[0][0] if failures and isinstance(failures[0], tuple) else (failures[0] if failures else e)
        if isinstance(exc, OSError) and exc.filename:
            raise ConvertError(f"{exc.filename}: {exc.strerror or type(exc).__name__}") from None
        if isinstance(exc, UnsafeMetadataError):
            raise ConvertError(f"{path}: {exc}") from None
        detail = (str(exc).splitlines() or [""])[0]
        raise ConvertError(f"{path}: cannot load tensor data ({type(exc).__name__}: {detail}) - run `prime-ckpt verify`") from None


class _CachedReader(SafeFileSystemReader):
    """:class:`SafeFileSystemReader` that reuses metadata already read (safely) once."""

    def __init__(self, path: Path, metadata: Metadata | None) -> None:
        super().__init__(str(path))
        self._cached = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._cached is None:
            return super().read_metadata(*args, **kwargs)
        if getattr(self._cached, "storage_meta", None) is None:
            self._cached.storage_meta = StorageMeta()
        self._cached.storage_meta.load_id = self.load_id
        return self._cached


# -- readers ----------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path] | None:
    """The safetensors file(s) ``path`` names: itself, or a weights step dir's shards (both
    layouts, :func:`prime_ckpt.layout.weights_files`); None if it is neither."""
    from prime_ckpt.layout import MODEL_FILE, SAFETENSORS_INDEX_FILE, weights_files

    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if path.is_dir() and ((path / MODEL_FILE).is_file() or (path / SAFETENSORS_INDEX_FILE).is_file() or any(path.glob("*.safetensors"))):
        try:
            return [Path(p) for p in weights_files(path)]
        except ValueError as e:
            raise ConvertError(str(e)) from None
    return None


def dcp_dir_of(path: Path | str) -> Path | None:
    """The DCP directory ``path`` names (a ``trainer/`` or any dir with ``.metadata``, or a
    checkpoint step dir holding ``trainer/``), or ``None``."""
    path = Path(path)
    if path.is_dir() and (has_dcp_metadata(path) or path.name == TRAINER_PART):
        return path
    if path.is_dir() and (path / TRAINER_PART).is_dir():
        return path / TRAINER_PART
    return None


#: Top-level keys that hold training state other than the model, in the checkpoints of this
#: project (``app.*``), torchtitan (``optimizer``, ``lr_scheduler``, ``dataloader``,
#: ``train_state``: its model tensors are flattened to the root) and common hand-written loops.
NON_MODEL_ROOTS = frozenset({
    "app", "optimizer", "optimizers", "optim", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader",
    "train_state", "rng", "rng_state", "progress", "step", "extra_state",
})


def model_prefix(keys: Iterable[str], key: str | None = None, *, where: Path | str = "") -> str:
    """The prefix under which a DCP checkpoint's model tensors live (pure).

    ``key`` given: that prefix (``"model"`` -> ``"model."``; ``""`` = the root). Else the first
    that holds tensors of: ``app.model.`` (this project), ``model.`` (``{"model": ...}`` state
    dicts, accelerate), the root minus :data:`NON_MODEL_ROOTS` (torchtitan, a plain ``dcp.save``
    of a model's state dict).

    Raises:
        ConvertError: nothing matches; names the top-level keys found and ``--key``.
    """
    keys = list(keys)
    if key is not None:
        prefix = key.strip(".") + "." if key.strip(".") else ""
        if not any(k.startswith(prefix) for k in keys):
            raise ConvertError(f"{where}: no tensors under --key {key!r} (top-level keys: {_roots(keys)})")
        return prefix
    for prefix in (MODEL_PREFIX, "model."):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    if any(k.split(".", 1)[0] not in NON_MODEL_ROOTS for k in keys):
        return ""
    raise ConvertError(f"{where}: no model tensors found (top-level keys: {_roots(keys)}); choose them with --key PREFIX")


def _roots(keys: list[str]) -> str:
    roots = sorted({k.split(".", 1)[0] for k in keys})
    return ", ".join(roots[:8]) + (f" (+{len(roots) - 8} more)" if len(roots) > 8 else "") if roots else "none"


def open_dcp(trainer_dir: Path, *, model_only: bool = False, key: str | None = None) -> TensorSource:
    """A DCP directory as a :class:`TensorSource` (reads ``.metadata`` only).

    With ``model_only`` the tensors are those under the model's prefix (:func:`model_prefix`,
    ``key`` to choose it), named without it; at the root, other training state
    (:data:`NON_MODEL_ROOTS`) is left out.
    """
    if not has_dcp_metadata(trainer_dir):
        raise ConvertError(f"{trainer_dir}: {DCP_METADATA_FILE} missing (save did not finish?)")
    md = read_dcp_metadata(trainer_dir)
    tensor_keys = [k for k, e in md.state_dict_metadata.items() if isinstance(e, TensorStorageMetadata)]
    prefix = model_prefix(tensor_keys, key, where=trainer_dir) if model_only else ""
    at_root = model_only and prefix == "" and key is None
    tensors: dict[str, TensorInfo] = {}
    non_tensors: list[str] = []
    for fqn, entry in md.state_dict_metadata.items():
        if not fqn.startswith(prefix) or (at_root and fqn.split(".", 1)[0] in NON_MODEL_ROOTS):
            continue
        if isinstance(entry, TensorStorageMetadata):
            tensors[fqn[len(prefix) :]] = TensorInfo(tuple(int(s) for s in entry.size), entry.properties.dtype)
        else:
            non_tensors.append(fqn[len(prefix) :])
    if model_only and not tensors:
        raise ConvertError(f"{trainer_dir}: no model tensors ({prefix or 'root'}*) in the checkpoint")
    return TensorSource("dcp", trainer_dir, tensors, non_tensors, prefix, md)


def open_safetensors(file: Path) -> TensorSource:
    """A safetensors file as a :class:`TensorSource` (reads its header only)."""
    from prime_ckpt.inspection import SAFETENSORS_DTYPES
    from prime_ckpt.manifest import safetensors_header

    try:
        header, expected = safetensors_header(file)
        size = file.stat().st_size
    except OSError as e:
        raise ConvertError(f"{file}: cannot read ({e.strerror or type(e).__name__})") from None
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if size != expected:
        raise ConvertError(f"{file}: size {size} != {expected} declared by its header (truncated?)")
    try:
        shard = rank_shard_info(file.name, header) is not None
    except ValueError as e:
        raise ConvertError(f"{file}: {e}") from None
    if shard:
        raise ConvertError(
            f"{file}: one rank's shard written by DCP's HuggingFaceStorageWriter without consolidation "
            "(DCP_SHARDING_INFO), not the full model; consolidate the shards first (DCP's consolidate_safetensors_files, "
            "or save with enable_consolidation=True) and give the consolidated files"
        )
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, SAFETENSORS_DTYPES.get(entry.get("dtype"), ""), None)
        if dtype is None:
            raise ConvertError(f"{file}: tensor {name}: unsupported dtype {entry.get('dtype')}")
        tensors[name] = TensorInfo(tuple(int(s) for s in entry["shape"]), dtype)
    return TensorSource("weights", file, dict(sorted(tensors.items())))


def open_source(path: Path | str, *, model_only: bool = False, key: str | None = None) -> TensorSource:
    """Open a checkpoint for reading tensors: a DCP dir / checkpoint step dir, a weights step
    dir or a ``.safetensors`` file.

    Raises:
        ConvertError: ``path`` is missing, incomplete, or none of the above.
        MetadataError: a DCP ``.metadata`` cannot be read safely.
    """
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: {missing_reason(path)}")
    shards = _safetensors_files(path)
    if shards is not None:
        if path.is_dir() and parse_step(path.name) is not None and not (path / WEIGHTS_MARKER).is_file():
            # this project's weights step: COMPLETE is written last; other producers' HF dirs have
            # no marker (every file's header is checked against its size below)
            raise ConvertError(f"{path}: no {WEIGHTS_MARKER} marker (weights not finished?)")
        if len(shards) == 1:
            return open_safetensors(shards[0])
        tensors: dict[str, TensorInfo] = {}
        files: dict[str, Path] = {}
        for shard in shards:
            if not shard.is_file():
                raise ConvertError(f"{shard}: missing (named by the weights index)")
            part = open_safetensors(shard)
            for name, info in part.tensors.items():
                if name in tensors:
                    raise ConvertError(f"{shard}: tensor {name!r} is also in {files[name].name}")
                tensors[name], files[name] = info, shard
        return TensorSource("weights", path, dict(sorted(tensors.items())), files=files)
    trainer_dir = dcp_dir_of(path)
    if trainer_dir is not None:
        return open_dcp(trainer_dir, model_only=model_only, key=key)
    if path.is_dir() and (path / "orchestrator.pt").is_file():
        raise ConvertError(f"{path}: no {TRAINER_PART}/ directory, not a trainer checkpoint")
    kind = "a directory" if path.is_dir() else "a file"
    raise ConvertError(
        f"{path}: not a checkpoint ({kind}; expected a DCP dir, a checkpoint step_<N> dir, a weights "
        "step dir or a .safetensors file)"
    )


# -- output safety ----------------------------------------------------------------------------
def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _step_dir_kind(path: Path) -> str | None:
    """``"checkpoint step"`` / ``"weights step"`` if ``path`` is an existing step directory:
    named ``step_<N>`` under ``checkpoints/`` or ``weights/``, or named ``step_<N>`` anywhere and
    holding a step's files (``trainer/``, ``orchestrator.pt``, ``COMPLETE``, ``manifest.json``)."""
    if parse_step(path.name) is None or not path.is_dir():
        return None
    if path.parent.name == CHECKPOINTS_DIR:
        return "checkpoint step"
    if path.parent.name == WEIGHTS_DIR:
        return "weights step"
    if (path / TRAINER_PART).is_dir() or (path / ORCHESTRATOR_FILE).is_file():
        return "checkpoint step"
    if (path / WEIGHTS_MARKER).is_file() or (path / MANIFEST_FILE).is_file():
        return "weights step"
    return None


def checkpoint_containing(out: Path | str) -> tuple[Path, str] | None:
    """The checkpoint a conversion output would be written into, or ``None``.

    ``out`` is inside a checkpoint when it is, or lies inside, an existing step directory
    (``checkpoints/step_<N>`` or ``weights/step_<N>``, or a ``step_<N>`` dir holding a step's
    files), or lies inside a DCP directory (one holding ``.metadata``). ``out`` being itself a
    standalone DCP directory (an earlier ``--to dcp`` output) is not "inside", nor is a step
    directory that does not exist yet (``checkpoints/step_<N>/trainer`` of a new step, to bring
    in a seed checkpoint: nothing there can be overwritten). Checked on the path as given (made
    absolute) and with symlinks resolved (``out`` itself, and its parent, where the temp file
    and the rename happen); nothing is created or opened.

    Args:
        out: the output path of a conversion (it need not exist).

    Returns:
        ``(directory, kind)``: the outermost checkpoint directory found and ``"checkpoint
        step"``, ``"weights step"`` or ``"DCP directory"``; ``None`` when ``out`` is outside
        every checkpoint.

    Raises:
        Nothing on its own (a symlink loop makes :meth:`Path.resolve` raise ``RuntimeError``
        before Python 3.13, ``OSError`` after; both are passed through).
    """
    out = Path(out)
    views = [out.parent.resolve() / out.name, out.resolve(), Path(os.path.abspath(out))]
    for view in dict.fromkeys(views):
        for parent in reversed(view.parents):
            kind = _step_dir_kind(parent)
            if kind is None and has_dcp_metadata(parent):
                kind = "DCP directory"
            if kind is None and parent != view:
                kind = foreign_checkpoint_kind(parent)  # another tool's: a save in progress, torchtitan, HF shards
            if kind is not None:
                return parent, kind
        kind = _step_dir_kind(view)
        if kind is not None:
            return view, kind
    return None


def refuse_inside_checkpoint(out: Path) -> None:
    """Raise :class:`ConvertError` (one line) if ``out`` is, or lies inside, a checkpoint or
    weights step (:func:`checkpoint_containing`) or cannot be resolved."""
    try:
        inside = checkpoint_containing(out)
    except (OSError, RuntimeError) as e:  # a symlink loop on the way to out
        raise ConvertError(f"{out}: cannot resolve the output path ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if inside is not None:
        where, kind = inside
        raise ConvertError(f"{out}: inside the {kind} {where}; convert never writes into a checkpoint, even with --force (choose an OUT outside it)")


def _check_parent(out: Path) -> None:
    """Refuse an ``out`` whose directory cannot be made or written: the nearest existing ancestor
    is a file, or is a directory this process may not write (one line, before anything is read)."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConvertError(f"{out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConvertError(f"{out}: {ancestor} is not writable (permission denied); choose another OUT")


def check_output(out: Path | str, source: Path | str, *, force: bool, directory: bool) -> Path:
    """Refuse an output that exists (without ``force``), lies inside the input, lies inside any
    checkpoint (:func:`checkpoint_containing`; even with ``force``), or (with ``force``) is
    something this conversion must not replace. Nothing is written.

    Returns:
        ``out`` as a Path.

    Raises:
        ConvertError: one line naming ``out`` and why it may not be written.
    """
    out, source = Path(out), Path(source)
    _check_parent(out)
    src_root = source
    if source.name == "model.safetensors" and source.is_file():
        src_root = source.parent
    elif source.name == TRAINER_PART and parse_step(source.parent.name) is not None:
        src_root = source.parent  # never write into the checkpoint step the input belongs to
    if _is_within(out, src_root) or _is_within(source, out):
        raise ConvertError(f"{out}: output overlaps the input {source} (the input is never modified)")
    refuse_inside_checkpoint(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise ConvertError(f"{out}: already exists (use --force to overwrite)")
        if not out.is_symlink() and not out.is_file() and not out.is_dir():
            raise ConvertError(f"{out}: exists and is not a regular file (a device, FIFO or socket); convert never replaces it")
        if directory:
            if not out.is_dir() or any(out.iterdir()):
                what = "a DCP checkpoint" if (out / DCP_METADATA_FILE).is_file() else "not an empty directory"
                raise ConvertError(f"{out}: exists and is {what}; convert never replaces it, even with --force (remove it yourself or choose another OUT)")
        elif out.is_dir():
            raise ConvertError(f"{out}: is a directory; give a file name")
    return out


# -- conversions ------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    """What a conversion wrote: ``output``, ``format``, ``tensors`` (count) and ``bytes``
    (tensor bytes written), the ``source`` and its ``source_kind``."""

    source: str
    source_kind: str
    output: str
    format: str
    tensors: int
    bytes: int
    dtype: str | None = None
    wrapped_in_app: bool = False


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner, SafeLoadPlanner):
    """DCP's ``_EmptyStateDictLoadPlanner`` (rebuilds the whole state dict from the metadata)
    with :class:`SafeLoadPlanner`'s ``load_bytes`` (non-tensor values via ``weights_only=True``)."""


def _tensor_stats(obj: Any) -> tuple[int, int]:
    if isinstance(obj, torch.Tensor):
        return 1, obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        n = b = 0
        for v in obj:
            dn, db = _tensor_stats(v)
            n, b = n + dn, b + db
        return n, b
    return 0, 0


def dcp_to_torch_save(source: Path | str, out: Path | str, *, force: bool = False) -> ConvertResult:
    """A DCP checkpoint (step dir or ``trainer/``) -> one ``torch.save`` file at ``out``.

    ``.metadata`` goes through the restricted unpickler and non-tensor values through
    ``weights_only=True`` (DCP's own ``dcp_to_torch_save`` uses full pickle for both).
    """
    src = open_source(source)
    if src.kind != "dcp":
        raise ConvertError(f"{source}: --to torch-save needs a DCP checkpoint (a step_<N> or trainer/ dir)")
    out = check_output(out, source, force=force, directory=False)
    sd: dict[str, Any] = {}
    _dcp_load(src.path, src._metadata, sd, _SafeEmptyPlanner())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: (torch.save(sd, f), os.fchmod(f.fileno(), 0o644)))
    n, b = _tensor_stats(sd)
    return ConvertResult(str(source), "dcp", str(out), "torch-save", n, b)


def to_safetensors(source: Path | str, out: Path | str, *, dtype: str | None = None, force: bool = False,
                   key: str | None = None) -> ConvertResult:
    """The model tensors of a DCP checkpoint (this project's, torchtitan's, a plain ``dcp.save``:
    :func:`model_prefix`) or a weights dir -> a safetensors file, mode 0644.

    ``out`` names the file, or a directory (an existing directory, a path ending in ``/``, or a
    name without a suffix that does not exist yet) that receives ``model.safetensors``.

    Args:
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``: cast floating-point tensors (others are kept).
        key: the prefix of the model's tensors in a DCP checkpoint (``--key``); None detects it.
    """
    from safetensors.torch import save_file

    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    src = open_source(source, model_only=True, key=key)
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir() or not (Path(out).suffix or Path(out).exists()):
        refuse_inside_checkpoint(Path(out))
        out = Path(out) / MODEL_FILE
    out = check_output(out, source, force=force, directory=False)
    if out.suffix != ".safetensors":  # what inspect and diff read as safetensors
        raise ConvertError(f"{out}: a safetensors output ends with .safetensors (or names a directory, which receives {MODEL_FILE})")
    target = DTYPES[dtype] if dtype else None
    tensors = {}
    for name, t in src.load(list(src.tensors)).items():
        if target is not None and t.is_floating_point():
            t = t.to(target)
        tensors[name] = t.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # an output for others to read (mkstemp-style temp files are 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    n, b = _tensor_stats(tensors)
    return ConvertResult(str(source), src.kind, str(out), "safetensors", n, b, dtype)


def torch_save_to_dcp(source: Path | str, out: Path | str, *, force: bool = False) -> ConvertResult:
    """A ``torch.save`` file -> a DCP directory at ``out`` (``weights_only=True`` load).

    A dict without a top-level ``"app"`` key is saved as ``{"app": dict}`` (see module docstring).
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    source = Path(source)
    if not source.exists():
        raise ConvertError(f"{source}: {missing_reason(source)}")
    if not source.is_file():
        raise ConvertError(f"{source}: not a file (--from torch-save needs a torch.save file)")
    out = check_output(out, source, force=force, directory=True)
    try:
        sd = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt/foreign file
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ConvertError(f"{source}: not a torch.save file loadable with weights_only=True ({type(e).__name__}: {detail})") from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{source}: holds a {type(sd).__name__}, expected a state dict (dict)")
    wrapped = "app" not in sd
    if wrapped:
        sd = {"app": sd}
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    try:
        flatten_state_dict(sd)  # DCP's own flattening: two paths to one key cannot be saved
    except ValueError as e:
        raise ConvertError(f"{source}: {' '.join(str(e).split())} (two entries, e.g. 'a.b' and 'a': {{'b': ...}}, "
                           "flatten to the same DCP key); nothing was written") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    remove_tree(tmp)
    try:
        _save_state_dict(sd, storage_writer=FileSystemWriter(str(tmp)), no_dist=True)
        if out.exists():
            remove_tree(out)
        os.replace(tmp, out)
    except BaseException:
        remove_tree(tmp)
        raise
    fsync_dir(out.parent)
    n, b = _tensor_stats(sd)
    return ConvertResult(str(source), "torch-save", str(out), "dcp", n, b, wrapped_in_app=wrapped)
