"""Compare two checkpoints tensor by tensor: the library behind ``prime-ckpt diff``.

Names, shapes and dtypes come from metadata only (DCP ``.metadata`` through the restricted
unpickler, the safetensors header). With ``values=True`` every tensor present on both sides with
the same shape and dtype is loaded, one tensor per side at a time, and compared: bitwise
equality and the maximum absolute difference (computed in float64, in chunks).

A DCP checkpoint compared with a weights dir / safetensors file is compared on the model only
(``app.model.*`` with the prefix stripped), since that is all a weights dir holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prime_ckpt.convert import TensorInfo, TensorSource, open_source
from prime_ckpt.inspection import dtype_name

SCHEMA = "prime-ckpt.diff/1"

#: Elements compared per chunk when computing the max abs difference (bounds extra memory).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class ValueDiff:
    """One tensor's values: ``equal`` (bitwise), ``max_abs_diff`` (float64; ``inf`` where one
    side is NaN/inf and the other is not; NaN == NaN at the same position counts as equal)."""

    name: str
    equal: bool
    max_abs_diff: float


@dataclass
class DiffResult:
    """Differences between checkpoints ``a`` and ``b`` (see :func:`diff`)."""

    a: str
    b: str
    a_kind: str
    b_kind: str
    model_only: bool
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)
    same_layout: int = 0
    non_tensors_added: list[str] = field(default_factory=list)
    non_tensors_removed: list[str] = field(default_factory=list)
    values: list[ValueDiff] | None = None
    non_tensor_values: list[dict[str, Any]] | None = None
    atol: float = 0.0

    @property
    def values_differ(self) -> list[ValueDiff]:
        if self.atol == 0:
            return [v for v in self.values or [] if not v.equal]
        return [v for v in self.values or [] if not v.equal and not v.max_abs_diff <= self.atol]

    @property
    def identical(self) -> bool:
        """No tensor or entry added/removed/changed and (with values) none differing."""
        return not (
            self.added or self.removed or self.changed or self.non_tensors_added or self.non_tensors_removed
            or self.values_differ or any(not v["equal"] for v in self.non_tensor_values or [])
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["values"] is not None:
            for v in d["values"]:
                v["max_abs_diff"] = _json_float(v["max_abs_diff"])
        return {"schema": SCHEMA, **d, "values_compared": self.values is not None, "identical": self.identical}


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _info(name: str, info: TensorInfo) -> dict[str, Any]:
    return {"name": name, "shape": list(info.shape), "dtype": dtype_name(info.dtype)}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """``(bitwise equal, max |a - b|)`` of two same-shape, same-dtype tensors, in chunks."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() == 0:
        return True, 0.0
    equal = torch.equal(fa.contiguous().view(torch.uint8), fb.contiguous().view(torch.uint8))
    if equal:
        return True, 0.0
    worst = 0.0
    for start in range(0, fa.numel(), CHUNK_ELEMENTS):
        ca = fa[start : start + CHUNK_ELEMENTS]
        cb = fb[start : start + CHUNK_ELEMENTS]
        if ca.is_complex():
            d = (ca.to(torch.complex128) - cb.to(torch.complex128)).abs()
        else:
            ca64, cb64 = ca.to(torch.float64), cb.to(torch.float64)
            d = (ca64 - cb64).abs()
            both_nan = torch.isnan(ca64) & torch.isnan(cb64)
            same_inf = torch.isinf(ca64) & (ca64 == cb64)
            d = torch.where(both_nan | same_inf, torch.zeros_like(d), d)
            d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
        worst = max(worst, float(d.max()))
    return False, worst


def _open_pair(a: Path | str, b: Path | str) -> tuple[TensorSource, TensorSource, bool]:
    sa, sb = open_source(a), open_source(b)
    if sa.kind != sb.kind:
        # a DCP checkpoint against weights: compare the model only
        sa = open_source(a, model_only=True) if sa.kind == "dcp" else sa
        sb = open_source(b, model_only=True) if sb.kind == "dcp" else sb
        return sa, sb, True
    return sa, sb, False


def diff(a: Path | str, b: Path | str, *, values: bool = False, atol: float = 0.0, on_tensor=None) -> DiffResult:
    """Compare checkpoints ``a`` and ``b`` (DCP dir / step dir, weights dir or .safetensors file).

    Args:
        values: also load and compare the values of tensors with the same name, shape and dtype,
            and of non-tensor DCP entries present on both sides (``weights_only`` loads).
        atol: with ``values``, a tensor whose max abs difference is <= ``atol`` counts as the same
            (0: only bitwise-equal tensors do).
        on_tensor: called with each tensor name as its values are compared (progress).
    Raises:
        ConvertError: a path is missing or not a checkpoint.
        MetadataError: a ``.metadata`` cannot be read safely.
    """
    sa, sb, model_only = _open_pair(a, b)
    result = DiffResult(str(a), str(b), sa.kind, sb.kind, model_only, atol=atol)
    for name, info in sb.tensors.items():
        if name not in sa.tensors:
            result.added.append(_info(name, info))
    common = []
    for name, info in sa.tensors.items():
        other = sb.tensors.get(name)
        if other is None:
            result.removed.append(_info(name, info))
        elif other != info:
            result.changed.append({"name": name, "a": _info(name, info), "b": _info(name, other)})
        else:
            common.append(name)
    result.same_layout = len(common)
    result.non_tensors_added = sorted(set(sb.non_tensors) - set(sa.non_tensors))
    result.non_tensors_removed = sorted(set(sa.non_tensors) - set(sb.non_tensors))
    if values:
        result.values = []
        for name in common:
            ta = sa.load([name])[name]
            tb = sb.load([name])[name]
            equal, worst = max_abs_diff(ta, tb)
            del ta, tb
            result.values.append(ValueDiff(name, equal, worst))
            if on_tensor is not None:
                on_tensor(name)
        common_values = sorted(set(sa.non_tensors) & set(sb.non_tensors))
        va, vb = sa.load_values(common_values), sb.load_values(common_values)
        result.non_tensor_values = [
            {"name": n, "equal": _plain_equal(va[n], vb[n])}
            | ({} if _plain_equal(va[n], vb[n]) else {"a": _short(va[n]), "b": _short(vb[n])})
            for n in common_values
        ]
    return result


def _plain_equal(x: Any, y: Any) -> bool:
    """Equality of two non-tensor values, by content: tensors bitwise, numpy arrays by dtype and
    elements, ``io.BytesIO`` by their bytes, containers element by element."""
    import io

    import numpy as np

    try:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        if type(x) is not type(y):
            return False
        if isinstance(x, np.ndarray):
            return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))
        if isinstance(x, io.BytesIO):
            return x.getvalue() == y.getvalue()
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(_plain_equal(a, b) for a, b in zip(x, y))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(_plain_equal(x[k], y[k]) for k in x)
        return bool(x == y)
    except Exception:  # noqa: BLE001 - exotic values: compare their reprs
        return repr(x) == repr(y)


def _short(x: Any, limit: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."
