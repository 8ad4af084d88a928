"""`inputs_to` moves example inputs of every form `run_model` takes."""
import torch

from prunekit.surgery.verify import inputs_to, run_model


def test_every_tensor_moves_and_other_values_stay():
    x = torch.randn(2, 3, dtype=torch.float64)
    meta = torch.device("meta")
    assert inputs_to(x, meta).device == meta
    moved = inputs_to((x, 3, "a"), meta)
    assert isinstance(moved, tuple) and moved[0].device == meta and moved[1:] == (3, "a")
    assert isinstance(inputs_to([x], meta), list)
    as_dict = inputs_to({"input": x, "scale": 2.0}, meta)
    assert as_dict["input"].device == meta and as_dict["scale"] == 2.0
    assert inputs_to(None, meta) is None


def test_moved_dict_inputs_still_run_the_model():
    class Keyword(torch.nn.Module):
        def forward(self, input, scale=1.0):
            return input * scale

    out = run_model(Keyword(), inputs_to({"input": torch.ones(2), "scale": 3.0}, "cpu"))
    assert torch.equal(out, torch.full((2,), 3.0))
