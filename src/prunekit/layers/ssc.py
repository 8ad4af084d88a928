"""`SSCConv2d`: a k x k convolution with a fixed structured support (structured sparse conv).

The support is an `SSCSpec` (groups G, spatial_period P_s, point_period P_p, tap pattern);
ssc_patterns.py defines it precisely, with a worked example. Only the real weights are stored:

    weight_kxk  (O, C/(G*P_s), k, k)   k x k taps, filters in class order (see below)
    weight_1x1  (O, C/(G*P_p), 1, 1)   1 x 1 taps on the filter's block (absent if P_p == P_s)

Two executions give the same output (tests check 1e-5):

- ``execution="structured"`` does only the real work. Inputs are permuted class by class
  (within each group: channels r, r+P_s, r+2P_s, ... for r = 0..P_s-1), which makes every
  filter's k x k inputs one contiguous slice and its 1 x 1 block P_s/P_p consecutive slices;
  filters are stored in the same class order. Then
      y_perm = conv_kxk(x_perm, groups=G*P_s) + conv_1x1(x_perm, groups=G*P_p)
      y = y_perm[:, inverse filter order]
  Shapes for C = O = 64, G = 1, P_s = 4, P_p = 1, 3x3, a (N, 64, H, W) input: x_perm is a
  gather (N, 64, H, W); conv_kxk has weight (64, 16, 3, 3) and 4 groups; conv_1x1 weight
  (64, 64, 1, 1); the 1 x 1 weight's entries on a filter's own class stay zero (those channels
  have the k x k centre instead): 16 of 64 per filter, i.e. 16 MACs beyond the 192 real taps (8%).
- ``execution="masked"`` scatters the real weights into the dense (O, C/G, k, k) weight (which
  is the dense weight times the fixed support) and runs one dense conv: for research and for
  comparisons with unstructured masks at equal width.

The forward goes through `ssc_conv2d`, one function the graph tracer sees as a single op, so
costs count real taps (params via `fixed_zero_params`, MACs via the graph rule below).

>>> import torch
>>> from prunekit.layers.ssc_patterns import SSCSpec
>>> layer = SSCConv2d(8, 8, 3, SSCSpec(spatial_period=4, point_period=2), padding=1)
>>> x = torch.randn(2, 8, 5, 5)
>>> masked = layer.with_execution("masked")
>>> bool(torch.allclose(layer(x), masked(x), atol=1e-5)), layer.real_params()
(True, 168)
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import handle_torch_function, has_torch_function

from ..core.errors import ConfigError
from .ssc_patterns import SSCLayout, SSCSpec

EXECUTIONS = ("structured", "masked")


_STEPS = [0]  # optimizer steps taken in this process (any torch.optim optimizer, fused or not)


def _count_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


class SSCConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, spec: SSCSpec | None = None,
                 stride=1, padding=0, dilation=1, bias: bool = True, execution: str = "structured"):
        super().__init__()
        spec = spec if spec is not None else SSCSpec()
        if isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2 and kernel_size[0] == kernel_size[1]:
            kernel_size = kernel_size[0]
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"SSCConv2d needs an odd square kernel, got kernel_size={kernel_size!r}")
        if execution not in EXECUTIONS:
            raise ConfigError(f"execution={execution!r}; choose one of {', '.join(EXECUTIONS)}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = (_int_pair("stride", stride, 1), _int_pair("padding", padding, 0),
                                                    _int_pair("dilation", dilation, 1))
        self.spec, self.execution = spec, execution
        lay = SSCLayout(in_channels, out_channels, kernel_size, spec)
        self.layout = lay
        self.weight_kxk = nn.Parameter(torch.empty(out_channels, lay.n_spatial, kernel_size, kernel_size)) \
            if lay.spatial else None
        self.weight_1x1 = nn.Parameter(torch.empty(out_channels, lay.n_block, 1, 1)) if lay.has_point else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # index tables are derived from the preset: not saved, rebuilt on construction
        for name in ("perm_in", "perm_out", "inv_out", "tap_mask", "point_mask"):
            self.register_buffer(name, getattr(lay, name).clone(), persistent=False)
        s_idx, p_idx = lay.dense_index()
        self.register_buffer("dense_idx_kxk", s_idx, persistent=False)
        self.register_buffer("dense_idx_1x1", p_idx, persistent=False)
        self._patterned = spec.pattern != "full" or bool((self.tap_mask == 0).any())
        self.reset_parameters()

    # ---- initialisation and dense views ------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Kaiming normal (ReLU gain) with each filter's real fan-in; bias U(-1/sqrt(fan), ..)."""
        fan = self.layout.real_taps_per_filter()[self.perm_out].to(torch.float32).clamp(min=1)  # class order
        std = (2.0 / fan).sqrt()
        with torch.no_grad():
            for w, mask in ((self.weight_kxk, self.tap_mask), (self.weight_1x1, self.point_mask)):
                if w is not None:
                    w.normal_().mul_(std.view(-1, 1, 1, 1)).mul_(mask)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(float(fan.mean()))
                self.bias.uniform_(-bound, bound)

    def _weights(self) -> tuple[Tensor | None, Tensor | None]:
        """Real weights with structural zeros enforced (so they get zero gradient). Without
        autograd (inference) the masked weights are cached until a parameter changes."""
        return self._cached("weights", self._masked_weights)

    def _cached(self, what: str, build):
        """build() under autograd; without it, the result cached until a parameter changes. Never
        cached while torch.jit.trace, torch.export or torch.compile records the layer: they must
        see the masking ops (a cached tensor would be frozen in as a constant, and export's fake
        tensors have no data pointer to key the cache by)."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            self.__dict__.pop("_inference_cache", None)  # a training step on its way
            return build()
        # inference tensors (copies made under inference_mode) have no version counter and cannot
        # change outside inference mode: their identity is enough. Fused optimizers (fused=True)
        # write the weights without bumping the counters: every optimizer step counts (_STEPS)
        key = (_STEPS[0],) + tuple((id(p), p.data_ptr(), 0 if p.is_inference() else p._version, p.dtype)
                                   for p in (self.weight_kxk, self.weight_1x1) if p is not None)
        cache = self.__dict__.setdefault("_inference_cache", {})
        if what not in cache or cache[what][0] != key:
            with torch.no_grad():
                cache[what] = (key, build())
        return cache[what][1]

    def clear_cache(self) -> None:
        """Forget the inference cache: needed after writing a weight through `.data`, which
        bypasses the version counter that in-place operations bump."""
        self.__dict__.pop("_inference_cache", None)

    def train(self, mode: bool = True) -> "SSCConv2d":
        self.clear_cache()  # model.eval() before an evaluation: weights are read afresh
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_cache()  # a load copies in place (and into inference tensors, which have no version)
        super()._load_from_state_dict(*args, **kwargs)

    def _masked_weights(self) -> tuple[Tensor | None, Tensor | None]:
        ws = self.weight_kxk
        if ws is not None and self._patterned:
            ws = ws * self.tap_mask
        wp = self.weight_1x1 * self.point_mask if self.weight_1x1 is not None else None
        return ws, wp

    def dense_weight(self) -> Tensor:
        """The equivalent dense (O, C/G, k, k) weight: zero outside the support."""
        k, ws, wp = self.kernel_size, *self._weights()
        ref = ws if ws is not None else wp
        flat = ref.new_zeros(self.out_channels * self.layout.cg * k * k)
        if ws is not None:
            flat = flat.index_add(0, self.dense_idx_kxk, ws.reshape(-1))
        if wp is not None:
            flat = flat.index_add(0, self.dense_idx_1x1, wp.reshape(-1))
        return flat.view(self.out_channels, self.layout.cg, k, k)

    def support(self) -> Tensor:
        """Bool (O, C/G, k, k): True where the layer has a real weight."""
        k, lay = self.kernel_size, self.layout
        flat = torch.zeros(self.out_channels * lay.cg * k * k, dtype=torch.bool)
        if lay.spatial:
            flat[self.dense_idx_kxk.cpu()] = (self.tap_mask.cpu() > 0).expand(-1, lay.n_spatial, k, k).reshape(-1)
        if lay.has_point:
            flat[self.dense_idx_1x1.cpu()] |= (self.point_mask.cpu() > 0).reshape(-1)
        return flat.view(self.out_channels, lay.cg, k, k)

    @torch.no_grad()
    def load_dense_weight_(self, weight: Tensor, bias: Tensor | None = None) -> "SSCConv2d":
        """Copy the taps of a dense (O, C/G, k, k) weight that lie on the support (the rest is
        dropped): the projection of a dense conv onto this layer. An ungrouped (O, C, k, k)
        weight is first cut to each filter's own group of input channels."""
        k, cg, groups = self.kernel_size, self.layout.cg, self.spec.groups
        want = (self.out_channels, cg, k, k)
        if groups > 1 and tuple(weight.shape) == (self.out_channels, cg * groups, k, k):
            # filter o of group g reads input channels g*cg .. (g+1)*cg - 1
            per_group = weight.view(groups, self.out_channels // groups, groups, cg, k, k)
            weight = per_group[torch.arange(groups), :, torch.arange(groups)].reshape(want)
        if tuple(weight.shape) != want:
            raise ConfigError(f"dense weight has shape {tuple(weight.shape)}, this layer needs {want}")
        flat = weight.reshape(-1).to(self._ref().device, self._ref().dtype)
        if self.weight_kxk is not None:
            self.weight_kxk.copy_(flat[self.dense_idx_kxk].view_as(self.weight_kxk) * self.tap_mask)
        if self.weight_1x1 is not None:
            self.weight_1x1.copy_(flat[self.dense_idx_1x1].view_as(self.weight_1x1) * self.point_mask)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self

    def _ref(self) -> Tensor:
        return self.weight_kxk if self.weight_kxk is not None else self.weight_1x1

    # ---- counting ---------------------------------------------------------------------------------
    def real_params(self) -> int:
        """Real weights (taps on the support) plus the bias."""
        return int(self.layout.real_taps_per_filter().sum()) + (self.out_channels if self.bias is not None else 0)

    def fixed_zero_params(self) -> int:
        """Stored parameter entries that are zero by construction (see cost.macs)."""
        stored = sum(p.numel() for p in self.parameters(recurse=False))
        return stored - self.real_params()

    def macs_per_pixel(self) -> int:
        """Multiply-accumulates per output pixel over all filters: the real taps."""
        return int(self.layout.real_taps_per_filter().sum())

    def with_execution(self, execution: str) -> "SSCConv2d":
        """A copy sharing this layer's parameters, running the other execution."""
        if execution not in EXECUTIONS:
            raise ConfigError(f"execution={execution!r}; choose one of {', '.join(EXECUTIONS)}")
        twin = copy.copy(self)
        twin._parameters, twin._buffers, twin._modules = dict(self._parameters), dict(self._buffers), {}
        twin.execution = execution
        return twin

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={s.groups}, spatial_period={s.spatial_period}, "
                f"point_period={s.point_period}, pattern={s.pattern}, execution={self.execution}")

    def forward(self, x: Tensor) -> Tensor:
        return ssc_conv2d(x, self)

    # ---- the two executions ------------------------------------------------------------------------
    def _masked(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self._cached("dense", self.dense_weight), self.bias, self.stride, self.padding, self.dilation,
                        self.spec.groups)

    def _structured(self, x: Tensor) -> Tensor:
        lay, (ws, wp) = self.layout, self._weights()
        permuted = lay.spatial and lay.ps > 1
        xp = x.index_select(1, self.perm_in) if permuted else x
        bias = self.bias[self.perm_out] if (self.bias is not None and permuted) else self.bias
        y = None
        if ws is not None:
            y = F.conv2d(xp, ws, bias, self.stride, self.padding, self.dilation, self.spec.groups * lay.ps)
        if wp is not None:
            size = y.shape[-2:] if y is not None else self._out_size(x)
            yp = F.conv2d(self._centre_view(xp, size), wp, bias if y is None else None, self.stride,
                          0, 1, self.spec.groups * lay.pp)
            y = yp if y is None else y + yp
        return y.index_select(1, self.inv_out) if permuted else y

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        k = self.kernel_size
        return tuple((x.shape[-2 + i] + 2 * self.padding[i] - self.dilation[i] * (k - 1) - 1) // self.stride[i] + 1
                     for i in range(2))

    def _centre_view(self, x: Tensor, size) -> Tensor:
        """The input pixels the kernel centre reads, so that a stride-s 1x1 conv with no padding
        lands on the same output grid: shift by dilation*(k//2) - padding, pad or crop the end."""
        pads = []
        for i in (1, 0):  # F.pad order: last dim first
            start = self.dilation[i] * (self.kernel_size // 2) - self.padding[i]
            need = (size[i] - 1) * self.stride[i] + 1
            pads += [-start, need - (x.shape[-2 + i] - start)]
        return x if not any(pads) else F.pad(x, pads)


def _int_pair(name: str, value, least: int) -> tuple[int, int]:
    """`value` (an int or a pair of ints, each >= `least`) as a pair; ConfigError otherwise."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < least for v in pair):
        hint = (": string padding is not supported; give the number (dilation * (kernel_size // 2) for 'same', "
                "0 for 'valid')") if isinstance(value, str) else ""
        raise ConfigError(f"{name}={value!r} must be an integer >= {least} or a pair of them{hint}")
    return pair


def ssc_conv2d(x: Tensor, layer: SSCConv2d) -> Tensor:
    """The forward of `layer` on `x`, dispatched as one torch function (so tracing sees one op)."""
    if has_torch_function((x,)):
        return handle_torch_function(ssc_conv2d, (x,), x, layer)
    return layer._structured(x) if layer.execution == "structured" else layer._masked(x)


def set_execution_(model: nn.Module, execution: str) -> int:
    """Switch every SSCConv2d of `model` to `execution` (same outputs); returns how many."""
    if execution not in EXECUTIONS:
        raise ConfigError(f"execution={execution!r}; choose one of {', '.join(EXECUTIONS)}")
    layers = [m for m in model.modules() if isinstance(m, SSCConv2d)]
    for m in layers:
        m.execution = execution
    return len(layers)


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv.padding as numbers: 'valid' is 0; 'same' (stride 1 only, in PyTorch) with an odd kernel
    pads dilation * (k // 2) on both sides."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ConfigError(f"cannot convert {conv}: padding='same' with an even kernel pads one side more than "
                              "the other, which an SSC layer cannot")
        return tuple(d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def from_conv(conv: nn.Conv2d, spec: SSCSpec, init: str = "kaiming", execution: str = "structured") -> SSCConv2d:
    """An SSC layer with `conv`'s shape (fresh Kaiming init, or `init="project"`: conv's taps on
    the support). Raises ConfigError if the conv is not a zero-padded, square, odd, ungrouped one."""
    k = conv.kernel_size[0]
    if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1] or conv.padding_mode != "zeros":
        raise ConfigError(f"cannot convert {conv}: SSC needs an ungrouped conv with a square kernel and zero padding")
    layer = SSCConv2d(conv.in_channels, conv.out_channels, k, spec, conv.stride, numeric_padding(conv), conv.dilation,
                      conv.bias is not None, execution).to(conv.weight.device, conv.weight.dtype)
    if init == "project":
        layer.load_dense_weight_(conv.weight, conv.bias)
    elif init != "kaiming":
        raise ConfigError(f"init={init!r}; choose kaiming (fresh weights) or project (the conv's weights on the support)")
    return layer


def _trace_rule(tr, call) -> None:
    """Graph rule for `ssc_conv2d`: the channels on both sides are kept (a removed channel would
    break the support's divisibility), MACs are the real taps."""
    from ..graph.ids import along

    x, layer, out = call.args[0], call.args[1], call.out
    tr.uf.mark_fixed(along(tr.ids(x), 1, x.shape[1], tr.uf))
    named = [(n, p) for n, p in (("weight_kxk", layer.weight_kxk), ("weight_1x1", layer.weight_1x1)) if p is not None]
    mod, _ = tr.tensor_name(named[0][1]) or (call.module, None)
    ids = tr.new_space(f"{mod}.{named[0][0]}" if mod else named[0][0], layer.out_channels, fixed=True)
    for name, _ in named:  # stored in class order
        tr.add_member(mod, name, 0, ids[layer.perm_out.cpu()], "out")
    if layer.bias is not None:
        tr.add_member(mod, "bias", 0, ids, "out")
    tr.set_ids(out, ids.reshape(1, -1, 1, 1))
    qual = f"{mod}.{named[0][0]}" if mod else named[0][0]
    tr.add_node(call, macs=layer.macs_per_pixel() * out.shape[0] * out.shape[2] * out.shape[3], params=[qual])


def _register_rule() -> None:
    from ..graph.rules import RULES, register_rule

    if "ssc_conv2d" not in RULES:
        register_rule("ssc_conv2d", _trace_rule)


_register_rule()

__all__ = ["EXECUTIONS", "SSCConv2d", "SSCSpec", "from_conv", "set_execution_", "ssc_conv2d"]
