"""Latency lookup tables: measured latency of one layer over a grid of channel counts.

A latency-aware pruning objective needs "how long does this layer take with `c_in` input and
`c_out` output channels?" for many candidate widths, far too often to time each one. So the layer
is timed once, standalone, on a grid of (in, out) counts on the target device, and the table then
answers any width by bilinear interpolation between grid points (`lookup` for numbers,
`lookup_tensor` for tensors, differentiable in the channel counts). Tables are plain JSON, carry
the device/dtype/batch they were measured with, and load back identically.

Supported layers: `linear` and `conv2d` with groups=1, depthwise `conv2d` (groups ==
in_channels, out_channels a multiple of it), the norms `batchnorm2d` (eval mode, [batch, C,
H, W]) and `layernorm` (over the last dim, [batch, tokens, C]), and `attention`: a whole
self-attention (nn.MultiheadAttention with batch_first, on [batch, tokens, C]: the qkv
projection, the attention products and the output projection; `heads` heads of C // heads
channels). Depthwise convs, norms and attention have one-dimensional tables: pruning changes
their input and output channels together.

>>> spec = LayerSpec(kind="conv2d", in_channels=8, out_channels=8, kernel=3, padding=1, height=8, width=8)
>>> table = build_conv_lut(spec, [4, 8], LatencyConfig(warmup=1, repeats=3))
>>> table.lookup(8, 8) == table.values_ms[1][1]
True
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..core.config import Config, check_choice
from ..core.errors import CheckpointError, ConfigError, read_json
from ..core.integrity import atomic_write_text
from .latency import LatencyConfig, compare_latency, measure_latency

_FORMAT = "prunekit-latency-table"
NORM_KINDS = ("batchnorm2d", "layernorm")
KINDS = ("conv2d", "linear", "attention") + NORM_KINDS


def _pair_ok(value: Any, minimum: int) -> bool:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return len(items) in (1, 2) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in items)


@dataclasses.dataclass
class LayerSpec(Config):
    """A standalone layer to time. kernel/stride/padding/dilation: int or [h, w].

    For `linear`, height*width > 1 means a token dimension (input [batch, height*width, in]),
    as in a transformer MLP; otherwise the input is [batch, in]. Conv inputs are [batch, in, H, W].

    >>> LayerSpec.from_module(nn.Conv2d(3, 16, 3, padding=1), (32, 32)).out_channels
    16
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel: Any = 1
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    height: int = 1
    width: int = 1
    bias: bool = True
    heads: int = 1  # attention only
    padding_mode: str = "zeros"  # conv2d: "zeros", "reflect", "replicate" or "circular"

    def validate(self) -> None:
        check_choice("kind", self.kind, KINDS)
        for name in ("in_channels", "out_channels", "groups", "height", "width", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; use an integer >= 1")
        for name, minimum in (("kernel", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            if not _pair_ok(getattr(self, name), minimum):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; use an integer >= {minimum} or [h, w]")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias={self.bias!r} is invalid; use true or false")
        check_choice("padding_mode", self.padding_mode, ("zeros", "reflect", "replicate", "circular"))
        if self.groups != 1 and not self.depthwise:
            raise ConfigError(f"groups={self.groups} is not supported; latency tables cover groups=1 and "
                              "depthwise convs (groups == in_channels, out_channels a multiple of it)")
        if self.kind != "conv2d" and self.groups != 1:
            raise ConfigError(f"a {self.kind} layer has no groups; use groups=1")
        if self.kind in NORM_KINDS + ("attention",) and self.in_channels != self.out_channels:
            raise ConfigError(f"a {self.kind} keeps its channels; give in_channels == out_channels")
        if self.kind != "attention" and self.heads != 1:
            raise ConfigError(f"a {self.kind} layer has no heads; use heads=1")
        if self.kind == "attention" and self.in_channels % self.heads:
            raise ConfigError(f"{self.in_channels} channels do not split into {self.heads} heads")

    @property
    def depthwise(self) -> bool:
        return (self.kind == "conv2d" and self.groups > 1 and self.groups == self.in_channels
                and self.out_channels % self.in_channels == 0)

    @property
    def one_axis(self) -> bool:
        """True when the table has one axis: input and output channels are pruned together."""
        return self.depthwise or self.kind in NORM_KINDS + ("attention",)

    @classmethod
    def from_module(cls, module: nn.Module, input_hw: Sequence[int] = (1, 1)) -> "LayerSpec":
        """Describe an nn.Conv2d (with its input H, W) or nn.Linear (with token grid H, W)."""
        h, w = (int(input_hw[0]), int(input_hw[1]))
        if isinstance(module, nn.Conv2d):
            return cls(kind="conv2d", in_channels=module.in_channels, out_channels=module.out_channels,
                       kernel=list(module.kernel_size), stride=list(module.stride), padding=_explicit_padding(module),
                       dilation=list(module.dilation), groups=module.groups, height=h, width=w,
                       bias=module.bias is not None, padding_mode=module.padding_mode)
        if isinstance(module, nn.Linear):
            return cls(kind="linear", in_channels=module.in_features, out_channels=module.out_features,
                       height=h, width=w, bias=module.bias is not None)
        if isinstance(module, nn.BatchNorm2d):
            return cls(kind="batchnorm2d", in_channels=module.num_features, out_channels=module.num_features,
                       height=h, width=w, bias=module.affine)
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            c = int(module.normalized_shape[0])
            return cls(kind="layernorm", in_channels=c, out_channels=c, height=h, width=w,
                       bias=module.elementwise_affine)
        if isinstance(module, nn.MultiheadAttention):
            if not (module.batch_first and module._qkv_same_embed_dim):
                raise ConfigError("only batch_first nn.MultiheadAttention with one embedding size for q, k and v "
                                  "is tabled")
            return cls(kind="attention", in_channels=module.embed_dim, out_channels=module.embed_dim,
                       heads=module.num_heads, height=h, width=w, bias=module.in_proj_bias is not None)
        raise ConfigError(f"{type(module).__name__} is not supported; give an nn.Conv2d, nn.Linear, "
                          "nn.BatchNorm2d, a one-dimensional nn.LayerNorm or a batch_first nn.MultiheadAttention")

    def make_layer(self, in_c: int, out_c: int) -> nn.Module:
        """The layer with `in_c` inputs and `out_c` outputs (depthwise: groups follow in_c)."""
        if self.kind == "linear":
            return nn.Linear(in_c, out_c, bias=self.bias)
        if self.kind == "batchnorm2d":
            return nn.BatchNorm2d(in_c, affine=self.bias).eval()
        if self.kind == "layernorm":
            return nn.LayerNorm(in_c, elementwise_affine=self.bias)
        if self.kind == "attention":  # heads of the original size where they divide in_c, else one
            head_dim = self.in_channels // self.heads
            return _SelfAttention(in_c, in_c // head_dim if in_c % head_dim == 0 else 1, self.bias)
        groups = in_c if self.depthwise else 1
        return nn.Conv2d(in_c, out_c, _tup(self.kernel), stride=_tup(self.stride), padding=_tup(self.padding),
                         dilation=_tup(self.dilation), groups=groups, bias=self.bias, padding_mode=self.padding_mode)

    def input_shape(self, in_c: int) -> tuple[int, ...]:
        """Per-sample input shape for `in_c` channels (the batch comes from LatencyConfig)."""
        if self.kind in ("conv2d", "batchnorm2d"):
            return (in_c, self.height, self.width)
        tokens = self.height * self.width
        return (tokens, in_c) if tokens > 1 else (in_c,)


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention called on one input, as a model calls it (for timing)."""

    def __init__(self, channels: int, heads: int, bias: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, bias=bias, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _explicit_padding(conv: nn.Conv2d) -> list[int]:
    """The conv's padding as integers: "valid" is 0, "same" (stride 1) is dilation * (kernel - 1) / 2
    where that is whole; an uneven "same" pads one side more, which a symmetric spec cannot hold."""
    if isinstance(conv.padding, tuple):
        return list(conv.padding)
    if conv.padding == "valid":
        return [0, 0]
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if conv.padding == "same" and all(t % 2 == 0 for t in total):
        return [t // 2 for t in total]
    raise ConfigError(f"padding={conv.padding!r} with kernel {tuple(conv.kernel_size)} pads one side more than the "
                      "other, which a latency table cannot describe; use explicit integer padding")


def _tup(v: Any) -> tuple[int, int]:
    return (v[0], v[-1]) if isinstance(v, (list, tuple)) else (v, v)


def pruning_grid(full: int, steps: int = 4) -> list[int]:
    """`channel_grid` plus a point at 1/16 of the width, the grid of tables used while pruning:
    a group may go below the grid's 1/steps (max_ratio allows 90%), and a lookup below the lowest
    point would be clamped, with no saving and no gradient.

    >>> pruning_grid(64)
    [4, 16, 32, 48, 64]
    """
    return sorted(set(channel_grid(full, steps)) | {max(1, full // 16)})


def channel_grid(full: int, steps: int = 4, multiple_of: int = 1) -> list[int]:
    """`steps` evenly spaced channel counts up to `full`, rounded to `multiple_of`.

    >>> channel_grid(64, steps=4)
    [16, 32, 48, 64]
    >>> channel_grid(10, steps=3, multiple_of=4)
    [4, 8, 10]
    """
    if full < 1 or steps < 1 or multiple_of < 1:
        raise ConfigError("channel_grid needs full >= 1, steps >= 1 and multiple_of >= 1")
    counts = {full}
    for k in range(1, steps):
        c = round(full * k / steps / multiple_of) * multiple_of
        counts.add(min(max(c, multiple_of, 1), full))
    return sorted(counts)


@dataclasses.dataclass
class LatencyTable:
    """Median latency (ms) of one layer spec on a channel grid; values_ms[i][j] is for
    (in_counts[i], out_counts[j]). Depthwise tables have out_counts == [] and one value per row."""

    spec: dict[str, Any]
    in_counts: list[int]
    out_counts: list[int]
    values_ms: list[list[float]]
    device: str
    device_name: str
    dtype: str
    batch: int
    torch_version: str
    settings: dict[str, Any]
    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._check_types()
        rows, cols = len(self.in_counts), max(len(self.out_counts), 1)
        shape_ok = len(self.values_ms) == rows and all(len(r) == cols for r in self.values_ms)
        if rows == 0 or not shape_ok:
            raise ConfigError(f"values_ms must be {rows} x {cols} (in_counts x out_counts) and non-empty")
        for axis in (self.in_counts, self.out_counts):
            if any(b <= a for a, b in zip(axis, axis[1:])):
                raise ConfigError(f"channel counts {axis} must be strictly increasing")

    def _check_types(self) -> None:
        """ConfigError naming the first field whose type or values a table cannot have."""
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        checks = [
            (isinstance(self.spec, dict), "spec must be a mapping"),
            (isinstance(self.settings, dict), "settings must be a mapping"),
            (all(isinstance(v, str) for v in (self.device, self.device_name, self.dtype, self.torch_version)),
             "device, device_name, dtype and torch_version must be text"),
            (whole(self.batch) and self.batch >= 1, "batch must be an integer >= 1"),
            (all(isinstance(a, list) and all(whole(c) and c >= 1 for c in a)
                 for a in (self.in_counts, self.out_counts)), "in_counts and out_counts must list integers >= 1"),
            (isinstance(self.values_ms, list) and all(isinstance(r, list) and all(number(v) for v in r)
                                                      for r in self.values_ms),
             "values_ms must be rows of finite latencies >= 0"),
        ]
        wrong = next((why for ok, why in checks if not ok), "")
        if wrong:
            raise ConfigError(f"latency table: {wrong}")
        try:  # the layer the table was timed on: one a LayerSpec can describe
            LayerSpec.from_dict(self.spec).validate()
        except ConfigError as err:
            raise ConfigError(f"latency table: spec: {err}") from None

    @property
    def depthwise(self) -> bool:
        return not self.out_counts

    def lookup(self, in_c: float, out_c: float | None = None, strict: bool = False) -> float:
        """Interpolated latency in ms; outside the grid the nearest edge is used (strict: raise).

        Depthwise tables use `in_c` only. Example: with values 1.0 at (4, 4) and 3.0 at (8, 4),
        lookup(6, 4) is 2.0.
        """
        x = torch.tensor(float(in_c), dtype=torch.float64)
        y = None if out_c is None else torch.tensor(float(out_c), dtype=torch.float64)
        return float(self.lookup_tensor(x, y, strict=strict))

    def lookup_tensor(self, in_c: torch.Tensor, out_c: torch.Tensor | None = None,
                      strict: bool = False) -> torch.Tensor:
        """Bilinear interpolation on tensors (any matching shapes), differentiable in in_c/out_c.

        The gradient is the slope of the enclosing grid cell; it is zero outside the grid, where
        the value is clamped to the edge.
        """
        dtype = in_c.dtype if in_c.is_floating_point() else torch.float64
        in_c = in_c.to(dtype)
        table = torch.tensor(self.values_ms, dtype=dtype, device=in_c.device)
        li, hi, fi = _bracket(torch.tensor(self.in_counts, dtype=dtype, device=in_c.device), in_c, strict, "in")
        if self.depthwise:
            return table[li, 0] * (1 - fi) + table[hi, 0] * fi
        if out_c is None:
            raise ConfigError("this table is for a groups=1 layer; give out_c as well as in_c")
        out_c = out_c.to(dtype)
        lo, ho, fo = _bracket(torch.tensor(self.out_counts, dtype=dtype, device=in_c.device), out_c, strict, "out")
        return ((1 - fi) * (1 - fo) * table[li, lo] + (1 - fi) * fo * table[li, ho]
                + fi * (1 - fo) * table[hi, lo] + fi * fo * table[hi, ho])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(format=_FORMAT, format_version=self.format_version)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable":
        if not isinstance(data, dict) or data.get("format") != _FORMAT:  # e.g. a plan or config file
            raise CheckpointError("not a prunekit latency table (missing format marker); "
                                  "build one with build_conv_lut and save it with LatencyTable.save")
        if data.get("format_version") != cls.format_version:
            raise CheckpointError(f"latency table format version {data.get('format_version')!r} is not "
                                  f"supported (this prunekit reads {cls.format_version}); rebuild the table")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise CheckpointError(f"latency table lacks field(s) {', '.join(missing)}; rebuild the table")
        try:
            return cls(**{n: data[n] for n in names})
        except ConfigError as err:
            raise CheckpointError(f"corrupt latency table: {err}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        return cls.from_dict(read_json(path, "latency table", "build and save the table again"))


def _bracket(axis: torch.Tensor, x: torch.Tensor, strict: bool, name: str):
    """Indices of the grid cell holding x (lo, hi) and x's fraction of the way from lo to hi."""
    if strict and bool(((x < axis[0]) | (x > axis[-1])).any()):
        raise ConfigError(f"{name} channel count outside the table's grid [{int(axis[0])}, {int(axis[-1])}]; "
                          "rebuild the table with a wider grid or use strict=False to clamp")
    x = x.clamp(float(axis[0]), float(axis[-1]))
    if axis.numel() == 1:
        zero = torch.zeros_like(x, dtype=torch.long)
        return zero, zero, torch.zeros_like(x)
    hi = torch.searchsorted(axis, x.detach().contiguous()).clamp(1, axis.numel() - 1)
    lo = hi - 1
    return lo, hi, (x - axis[lo]) / (axis[hi] - axis[lo])


def _counts(values: Any, what: str) -> list[int]:
    ok = isinstance(values, (list, tuple)) and values and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        raise ConfigError(f"{what} channel counts {values!r} are invalid; give a list of integers >= 1")
    return sorted(set(values))


def build_conv_lut(spec: LayerSpec, channel_counts: Any = None, cfg: LatencyConfig | None = None) -> LatencyTable:
    """Time `spec`'s layer at every grid point and return the table.

    channel_counts: a list of counts used for both axes, a pair (in_counts, out_counts), or None
    for `channel_grid` of the spec's own widths. Each row (fixed in_c) is timed interleaved, so
    drift during the build hits a row's points alike.

    >>> spec = LayerSpec(kind="linear", in_channels=16, out_channels=16)
    >>> t = build_conv_lut(spec, ([8, 16], [4, 16]), LatencyConfig(warmup=1, repeats=3))
    >>> (t.in_counts, t.out_counts, len(t.values_ms), len(t.values_ms[0]))
    ([8, 16], [4, 16], 2, 2)
    """
    cfg = cfg or LatencyConfig(warmup=3, repeats=10)
    if channel_counts is None:
        in_counts, out_counts = channel_grid(spec.in_channels), channel_grid(spec.out_channels)
    elif isinstance(channel_counts, (list, tuple)) and len(channel_counts) == 2 and all(
            isinstance(c, (list, tuple)) for c in channel_counts):
        if spec.one_axis:
            raise ConfigError(f"a {spec.kind} table with groups={spec.groups} has one axis (its channels); "
                              "give one list of counts")
        in_counts, out_counts = _counts(channel_counts[0], "in"), _counts(channel_counts[1], "out")
    else:
        in_counts = out_counts = _counts(channel_counts, "the")
    values, meta = [], {}
    if spec.one_axis:
        mult = spec.out_channels // spec.in_channels
        out_counts = []
        for c in in_counts:
            res = measure_latency(spec.make_layer(c, c * mult), spec.input_shape(c), cfg)
            values.append([res.median_ms])
            meta = res
    else:
        for c_in in in_counts:
            layers = {str(c_out): spec.make_layer(c_in, c_out) for c_out in out_counts}
            cmp = compare_latency(layers, spec.input_shape(c_in), cfg)
            values.append([cmp.results[str(c_out)].median_ms for c_out in out_counts])
            meta = cmp.results[str(out_counts[0])]
    settings = {k: v for k, v in meta.settings.items() if k not in ("input_shapes", "interleaved_with", "input")}
    return LatencyTable(spec=spec.to_dict(), in_counts=list(in_counts), out_counts=list(out_counts),
                        values_ms=values, device=meta.device, device_name=meta.device_name, dtype=meta.dtype,
                        batch=meta.batch, torch_version=meta.torch_version, settings=settings)
