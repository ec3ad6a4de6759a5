"""prime_ckpt.convert_options: which --to / --from / --dtype / --key combinations `prime-ckpt
convert` accepts, and which conversion each one runs (pure, torch-free)."""

import pytest

from prime_ckpt.convert_options import CONVERSIONS, ConvertError, choose_conversion
from prime_ckpt.errors import PrimeCkptError


@pytest.mark.parametrize(
    ("options", "conversion"),
    [
        ({"from_": "torch-save"}, "torch_save_to_dcp"),
        ({"from_": "torch-save", "to": "dcp"}, "torch_save_to_dcp"),
        ({"from_": "torch-save", "key": "model"}, "torch_save_to_dcp"),  # --key is not checked there (as before)
        ({"to": "torch-save"}, "dcp_to_torch_save"),
        ({"to": "safetensors"}, "to_safetensors"),
        ({"to": "safetensors", "dtype": "bf16", "key": "app.model"}, "to_safetensors"),
        ({"to": "safetensors", "dtype": "fp32", "key": ""}, "to_safetensors"),
    ],
)
def test_valid_combinations_pick_their_conversion(options, conversion):
    assert choose_conversion("ck/step_3", **options) == conversion
    assert conversion in CONVERSIONS


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"from_": "torch-save", "to": "safetensors"}, "ck/step_3: --from torch-save converts to dcp only (got --to safetensors)"),
        ({"from_": "torch-save", "to": "torch-save"}, "ck/step_3: --from torch-save converts to dcp only (got --to torch-save)"),
        ({"from_": "torch-save", "dtype": "bf16"}, "ck/step_3: --dtype applies to --to safetensors only"),
        ({}, "ck/step_3: --to is required (torch-save or safetensors), or --from torch-save"),
        ({"dtype": "bf16"}, "ck/step_3: --to is required (torch-save or safetensors), or --from torch-save"),
        ({"to": "dcp"}, "ck/step_3: --to dcp needs --from torch-save (the input is already DCP or safetensors)"),
        ({"to": "torch-save", "key": "model"}, "ck/step_3: --key applies to --to safetensors only"),
        ({"to": "torch-save", "dtype": "fp16"}, "ck/step_3: --dtype applies to --to safetensors only"),
        ({"to": "onnx"}, "ck/step_3: --to onnx: expected one of torch-save, safetensors, dcp"),
        ({"to": "safetensors", "from_": "pickle"}, "ck/step_3: --from pickle: expected one of auto, torch-save"),
        ({"to": "safetensors", "dtype": "int8"}, "--dtype int8: expected one of bf16, fp16, fp32"),
    ],
)
def test_meaningless_combinations_are_one_line_errors(options, message):
    with pytest.raises(ConvertError) as e:
        choose_conversion("ck/step_3", **options)
    assert str(e.value) == message
    assert isinstance(e.value, PrimeCkptError) and isinstance(e.value, ValueError)


def test_convert_error_is_the_one_convert_raises():
    from prime_ckpt import convert, tensor_source

    assert convert.ConvertError is ConvertError is tensor_source.ConvertError
