"""Conversions between checkpoint formats (``prime-ckpt convert``).

Each conversion writes to a temp name beside the output and renames it into place; an existing
output is replaced only with ``force``; the input is only read (through
:mod:`prime_ckpt.tensor_source`); an output inside any checkpoint or weights step is refused
even with ``force`` (:mod:`prime_ckpt.convert_output`). :func:`convert` picks the conversion
from the CLI's options (:func:`prime_ckpt.convert_options.choose_conversion`).

* :func:`dcp_to_torch_save`: a DCP checkpoint -> one ``torch.save`` file holding the nested state
  dict (``{"app": {"model": ..., "optimizer": ..., ...}}``). Loads the whole state in memory.
* :func:`to_safetensors`: a DCP checkpoint or a weights dir -> ``model.safetensors`` with the
  model tensors only (names without ``app.model.``), optionally cast to another float dtype.
* :func:`torch_save_to_dcp`: a ``torch.save`` file (e.g. the seed's single-file ``trainer.pt``),
  read with ``weights_only=True`` -> a DCP directory. A state dict without a top-level ``"app"``
  key is stored under ``"app"`` so that its ``model``/``optimizer`` entries get the keys
  :class:`prime_ckpt.checkpointer.Checkpointer` uses (``app.model.*`` ...).

The readers and output checks that used to live here are re-exported under their old names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

from prime_ckpt.convert_options import DTYPE_NAMES, ConvertError, check_dtype, choose_conversion
from prime_ckpt.convert_output import (  # noqa: F401 - old import paths
    check_output,
    checkpoint_containing,
    refuse_inside_checkpoint,
)
from prime_ckpt.dcp_io import SafeLoadPlanner
from prime_ckpt.layout import MODEL_FILE
from prime_ckpt.storage import atomic_write, fsync_dir, missing_reason, remove_tree, tmp_path_for
from prime_ckpt.storage.writes import atomic_write_path
from prime_ckpt.tensor_source import (  # noqa: F401 - old import paths
    MODEL_PREFIX,
    NON_MODEL_ROOTS,
    TensorInfo,
    TensorSource,
    dcp_dir_of,
    dcp_load,
    model_prefix,
    open_dcp,
    open_safetensors,
    open_source,
)

__all__ = [
    "DTYPES", "MODEL_PREFIX", "NON_MODEL_ROOTS", "ConvertError", "ConvertResult", "TensorInfo", "TensorSource",
    "check_output", "checkpoint_containing", "convert", "dcp_dir_of", "dcp_to_torch_save", "model_prefix",
    "open_dcp", "open_safetensors", "open_source", "refuse_inside_checkpoint", "to_safetensors", "torch_save_to_dcp",
]

#: ``--dtype`` names for :func:`to_safetensors` (:data:`~prime_ckpt.convert_options.DTYPE_NAMES`) -> torch dtypes.
DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))


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
    dcp_load(src.path, src._metadata, sd, _SafeEmptyPlanner())
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

    check_dtype(dtype)
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
    atomic_write_path(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}), mode=0o644)
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


def convert(source: Path | str, out: Path | str, *, to: str | None = None, from_: str = "auto", dtype: str | None = None,
            force: bool = False, key: str | None = None) -> ConvertResult:
    """``prime-ckpt convert``: the conversion the options ask for
    (:func:`~prime_ckpt.convert_options.choose_conversion`), run.

    Raises:
        ConvertError: a meaningless option combination (nothing read or written), or what the
            chosen conversion raises.
    """
    chosen = choose_conversion(source, to=to, from_=from_, dtype=dtype, key=key)
    if chosen == "torch_save_to_dcp":
        return torch_save_to_dcp(source, out, force=force)
    if chosen == "dcp_to_torch_save":
        return dcp_to_torch_save(source, out, force=force)
    return to_safetensors(source, out, dtype=dtype, force=force, key=key)
