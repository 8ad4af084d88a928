"""The kind of dtype (bool, int, float, complex) read from a .safetensors header equals the
tensor's own, for every dtype safetensors stores: loading checks kinds without reading tensors."""
import pytest
import torch
from safetensors.torch import save_file

from prunekit.surgery.tensor_file import _kind, dtype_kind_error, header_dtypes

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.complex64]
DTYPES += [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
           if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_header_kind_equals_the_tensors_kind(tmp_path, dtype):
    t = torch.zeros(3, dtype=dtype)
    path = tmp_path / "w.safetensors"
    try:
        save_file({"w": t}, str(path))
    except (TypeError, ValueError, KeyError) as err:  # a dtype this safetensors does not store
        pytest.skip(f"safetensors cannot store {dtype}: {err}")
    assert _kind(header_dtypes(path)["w"]) == _kind(t)


def test_dtype_kind_error_reads_header_names(tmp_path):
    save_file({"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(2, dtype=torch.bfloat16)},
              str(tmp_path / "w.safetensors"))
    state = {"a": torch.zeros(2), "b": torch.zeros(2)}
    assert dtype_kind_error(state, header_dtypes(tmp_path / "w.safetensors")).startswith("1 tensors")
    assert "(first: a)" in dtype_kind_error(state, header_dtypes(tmp_path / "w.safetensors"))
