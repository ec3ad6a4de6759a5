"""``prime-ckpt convert`` and ``prime-ckpt diff``: converting a checkpoint between formats, and
comparing two (local paths only).

Both need torch: their library modules (:mod:`prime_ckpt.convert`, :mod:`prime_ckpt.compare`)
are imported inside the commands, so the read-only commands start without it. Which option
combinations are valid is the library's rule (:mod:`prime_ckpt.convert_options`).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table

from prime_ckpt.cli.app import app
from prime_ckpt.cli.errors import EXIT_CHECK_FAILED, user_errors
from prime_ckpt.cli.options import refuse_remote
from prime_ckpt.cli.render import console, esc, fmt_bytes, print_json, progress, safe_tree, table
from prime_ckpt.convert_options import DTYPE_NAMES, FROM_FORMATS, TO_FORMATS, ConvertError


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of ``values`` for typer (member names: the values with ``-`` as ``_``)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)  # type: ignore[return-value]


_To = _choices("_To", TO_FORMATS)
_From = _choices("_From", FROM_FORMATS)
_DType = _choices("_DType", DTYPE_NAMES)


@app.command("convert")
def convert_cmd(
    src: Annotated[str, typer.Argument(metavar="PATH", help="Checkpoint step_<N> dir or trainer/ DCP dir; a weights step dir (for safetensors); a torch.save file (with --from torch-save).")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="Output file (torch-save, safetensors) or directory (dcp).")],
    to: Annotated[_To | None, typer.Option("--to", help="Output format (default: dcp with --from torch-save; required otherwise).")] = None,
    from_: Annotated[_From, typer.Option("--from", help="Input format: auto (DCP or weights dir) or torch-save (a torch.save file).")] = _From.auto,
    dtype: Annotated[_DType | None, typer.Option("--dtype", help="safetensors only: cast floating-point tensors to this dtype.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is an existing regular file (never a device, FIFO, non-empty directory, a DCP checkpoint or a part of one).")] = False,
    key: Annotated[str | None, typer.Option("--key", metavar="PREFIX", help="safetensors from DCP: the prefix of the model's tensors (e.g. app.model, model; '' = the root). Default: detected.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Convert a checkpoint: DCP -> torch.save file or model.safetensors; torch.save -> DCP.

    \b
    --to torch-save   DCP -> one torch.save file of the nested state dict {"app": {...}}
                      (model, optimizer, scheduler, progress, rank state; all in memory).
    --to safetensors  DCP or weights dir -> HF-style model.safetensors with the model tensors
                      only, named without their prefix, optionally --dtype bf16|fp16|fp32. The
                      model's prefix is detected: app.model. (prime-ckpt), model. ({"model": ...},
                      accelerate), else the root minus optimizer/lr_scheduler/dataloader/
                      train_state (torchtitan, a plain dcp.save of a model); --key PREFIX chooses.
                      OUT is the file, or a directory receiving model.safetensors when it exists,
                      ends in "/" or has no suffix. Files are written 0644.
    --from torch-save PATH.pt OUT   torch.save file (e.g. the seed's single-file trainer.pt),
                      loaded with weights_only=True -> DCP dir; a dict without a top-level
                      "app" key is stored under "app" (keys app.model.* like the trainer's).
    .metadata is read through the restricted unpickler and non-tensor values with
    weights_only=True. The input is never modified; OUT is written under a temp name and
    renamed into place; an existing OUT is refused without --force; OUT inside the input, or
    inside any checkpoint or weights step (checkpoints/step_<N>, weights/step_<N>, a DCP dir,
    also one still being written or saved per rank, torchtitan's checkpoint/step-<N>, DCP
    HuggingFace-writer shards; symlinks resolved), is refused even with --force. A safetensors
    OUT ends with .safetensors, or names a directory that receives model.safetensors.
    JSON: {"schema": "prime-ckpt.convert/1", source, source_kind: "dcp"|"weights"|"torch-save",
           output, format, tensors, bytes, dtype, wrapped_in_app}
    Local paths only for now (a URL is refused, exit 2).
    Exit codes: 0 written; 2 bad input, bad option or existing output.
    """
    refuse_remote("convert", src, out)
    from dataclasses import asdict

    from prime_ckpt.convert import convert

    with user_errors(ConvertError):
        result = convert(src, out, to=to.value if to else None, from_=from_.value, dtype=dtype.value if dtype else None,
                         force=force, key=key)
    if as_json:
        print_json({"schema": "prime-ckpt.convert/1", **asdict(result)})
        return
    note = " (stored under top-level key 'app')" if result.wrapped_in_app else ""
    console().print(
        f"wrote {result.output} ({result.format}): {result.tensors} tensors, {result.bytes} bytes "
        f"({fmt_bytes(result.bytes)}) from {result.source} ({result.source_kind}){note}",
        markup=False,
        soft_wrap=True,
    )


# -- diff -----------------------------------------------------------------------------------------
@app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(metavar="A", help="Checkpoint step_<N> dir / trainer/ DCP dir, weights step dir or .safetensors file.")],
    b: Annotated[str, typer.Argument(metavar="B", help="The same kinds as A.")],
    values: Annotated[bool, typer.Option("--values", help="Also load and compare tensor values (one tensor per side at a time).")] = False,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="With --values: a max abs difference <= ATOL counts as equal (default 0: bitwise).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema below) instead of tables.")] = False,
) -> None:
    """Compare two checkpoints: tensors added, removed, changed shape/dtype; with --values, values.

    \b
    Without --values only metadata is read (.metadata through the restricted unpickler,
    safetensors headers). A DCP checkpoint against weights compares the model only
    (app.model.* without the prefix). Non-tensor DCP entries are compared by name.
    JSON ("schema": "prime-ckpt.diff/1"):
      {a, b, a_kind, b_kind: "dcp"|"weights", model_only: bool,
       added / removed: [{name, shape, dtype}], changed: [{name, a: {..}, b: {..}}],
       same_layout: int (same name, shape, dtype), non_tensors_added / _removed: [name],
       values: [{name, equal (bitwise), max_abs_diff (float, or "inf"/"nan")}] | null,
       non_tensor_values: [{name, equal, a?, b? (reprs when different)}] | null,
       atol, values_compared: bool,
       identical: bool (without --values: the layout only, values_compared false)}
    Local paths only for now (a URL is refused, exit 2).
    Exit codes: 0 identical (without --values: same layout; values not compared); 1 different;
    2 bad path or unreadable/unsafe metadata.
    """
    refuse_remote("diff", a, b)
    from prime_ckpt.compare import diff

    with user_errors(ConvertError):
        if values:
            from prime_ckpt.tensor_source import open_source

            n = len(open_source(a).tensors)
            with progress(n, "comparing") as advance:
                result = diff(a, b, values=True, atol=atol, on_tensor=lambda _name: advance(1))
        else:
            result = diff(a, b)
    d = result.to_dict()
    if as_json:
        print_json(d)
    else:
        raw, d = d, safe_tree(d)
        con = console()
        con.print(f"A: {d['a']} ({d['a_kind']})\nB: {d['b']} ({d['b_kind']})" + ("\n(model tensors only)" if d["model_only"] else ""))
        for key, title in (("added", "only in B (added)"), ("removed", "only in A (removed)")):
            if d[key]:
                t = table(title, ("name", "shape", "dtype"))
                for x in d[key]:
                    t.add_row(x["name"], str(x["shape"]), x["dtype"])
                con.print(t)
        if d["changed"]:
            t = table("changed shape or dtype", ("name", "A", "B"))
            for x in d["changed"]:
                t.add_row(x["name"], f"{x['a']['shape']} {x['a']['dtype']}", f"{x['b']['shape']} {x['b']['dtype']}")
            con.print(t)
        for key, title in (("non_tensors_added", "non-tensor entries only in B"), ("non_tensors_removed", "non-tensor entries only in A")):
            if d[key]:
                con.print(f"{title}: " + ", ".join(d[key]))
        if values:
            differ = result.values_differ
            if differ:
                t = Table(title="values differ", title_justify="left")
                t.add_column("name", overflow="fold")
                t.add_column("max abs diff", justify="right")
                for v in differ:
                    t.add_row(esc(v.name), f"{v.max_abs_diff:.6g}")
                con.print(t)
            con.print(f"values: {len(result.values or []) - len(differ)} of {len(result.values or [])} tensors equal" + (f" (atol {atol:g})" if atol else " (bitwise)"))
            for v in raw["non_tensor_values"] or []:
                if not v["equal"]:
                    con.print(f"non-tensor {esc(v['name'])}: {esc(v['a'])} != {esc(v['b'])}", soft_wrap=True)
        summary = (
            f"{len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed, {d['same_layout']} same layout"
        )
        if not result.identical:
            verdict = "different: "
        elif values:
            verdict = "identical: "
        else:  # only names, shapes and dtypes were compared
            verdict = "same layout (values not compared; --values compares them): "
        con.print(verdict + summary)
    if not result.identical:
        raise typer.Exit(EXIT_CHECK_FAILED)
