"""What a conversion may be asked to do: the valid ``--to`` / ``--from`` / ``--dtype`` / ``--key``
combinations of ``prime-ckpt convert``, and :class:`ConvertError`, the one error a refused
conversion raises.

Pure and torch-free: :func:`choose_conversion` only looks at the options, never at the files
(the conversions in :mod:`prime_ckpt.convert` check the input and the output themselves).
"""

from __future__ import annotations

from pathlib import Path

from prime_ckpt.errors import PrimeCkptError

#: Output formats (``--to``).
TO_FORMATS = ("torch-save", "safetensors", "dcp")

#: Input formats (``--from``): ``auto`` is a DCP checkpoint or a weights dir / safetensors file.
FROM_FORMATS = ("auto", "torch-save")

#: ``--dtype`` names (safetensors output only).
DTYPE_NAMES = ("bf16", "fp16", "fp32")

#: The conversion :func:`choose_conversion` picks, by the name of its function in
#: :mod:`prime_ckpt.convert`.
CONVERSIONS = ("torch_save_to_dcp", "dcp_to_torch_save", "to_safetensors")


class ConvertError(PrimeCkptError, ValueError):
    """An input that cannot be read as asked, or an output that may not be written (one line,
    names the path)."""


def check_dtype(dtype: str | None) -> None:
    """Raise :class:`ConvertError` unless ``dtype`` is None or one of :data:`DTYPE_NAMES`."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")


def choose_conversion(source: Path | str, *, to: str | None = None, from_: str = "auto", dtype: str | None = None,
                      key: str | None = None) -> str:
    """The conversion the options ask for (pure).

    Args:
        source: the input path (only named in the error).
        to: one of :data:`TO_FORMATS`, or None (allowed with ``from_="torch-save"`` only: dcp).
        from_: one of :data:`FROM_FORMATS`.
        dtype: one of :data:`DTYPE_NAMES` (``--to safetensors`` only), or None.
        key: the model's prefix (``--to safetensors`` from DCP only), or None.

    Returns:
        One of :data:`CONVERSIONS`: ``"torch_save_to_dcp"`` (``--from torch-save``, ``--to dcp`` or
        none), ``"dcp_to_torch_save"`` (``--to torch-save``), ``"to_safetensors"``.

    Raises:
        ConvertError: an unknown value, or a combination that means nothing (``--to dcp`` without
            ``--from torch-save``; ``--dtype`` / ``--key`` with an output other than safetensors;
            no ``--to`` without ``--from torch-save``). One line naming ``source`` and the option.
    """
    if to is not None and to not in TO_FORMATS:
        raise ConvertError(f"{source}: --to {to}: expected one of {', '.join(TO_FORMATS)}")
    if from_ not in FROM_FORMATS:
        raise ConvertError(f"{source}: --from {from_}: expected one of {', '.join(FROM_FORMATS)}")
    check_dtype(dtype)
    if from_ == "torch-save":
        if to not in (None, "dcp"):
            raise ConvertError(f"{source}: --from torch-save converts to dcp only (got --to {to})")
        if dtype is not None:
            raise ConvertError(f"{source}: --dtype applies to --to safetensors only")
        return "torch_save_to_dcp"
    if to is None:
        raise ConvertError(f"{source}: --to is required (torch-save or safetensors), or --from torch-save")
    if to == "dcp":
        raise ConvertError(f"{source}: --to dcp needs --from torch-save (the input is already DCP or safetensors)")
    if to == "torch-save":
        if key is not None:
            raise ConvertError(f"{source}: --key applies to --to safetensors only")
        if dtype is not None:
            raise ConvertError(f"{source}: --dtype applies to --to safetensors only")
        return "dcp_to_torch_save"
    return "to_safetensors"
