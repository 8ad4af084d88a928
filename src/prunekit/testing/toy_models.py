"""Small models that exercise every channel rule; the oracle tests run over all of them.

Each entry of `TOY_MODELS` maps a name to (builder, example input builder). They are tiny on
purpose (a forward takes milliseconds) and cover: conv/BN chains, residual adds with projection
and zero-pad shortcuts, concat, split/chunk with channel shuffle, flatten into Linear, permute +
channels-last LayerNorm with layer scale, depthwise and grouped convs, squeeze-excitation,
GroupNorm/InstanceNorm/PReLU, transposed conv, nn.MultiheadAttention, LSTM/GRU, Linear-qkv attention with
scaled_dot_product_attention, embeddings, Python control flow in forward, and rolls, flips,
where / masked_fill conditions and tensor clamp bounds.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ResidualNet(nn.Module):
    """Two stages of basic blocks; the second starts with a strided projection shortcut."""

    def __init__(self, zero_pad: bool = False):
        super().__init__()
        self.zero_pad = zero_pad
        self.stem = _cbr(3, 8)
        self.a1, self.a2 = _cbr(8, 8), nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.b1, self.b2 = _cbr(8, 16, stride=2), nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a2(self.a1(x)))
        if self.zero_pad:  # option A: subsample and pad channels with zeros (count fixed in code)
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        else:
            short = self.proj(x)
        x = F.relu(short + self.b2(self.b1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(3, 6), _cbr(3, 10)
        self.c = _cbr(16, 12)
        self.d = _cbr(28, 8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = torch.cat([y, self.c(y)], 1)
        return self.fc(self.d(y).flatten(1))


class ShuffleNetish(nn.Module):
    """chunk -> branch -> cat -> channel shuffle, as in ShuffleNetV2 units."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.branch = nn.Sequential(_cbr(8, 8, 1), nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), _cbr(8, 8, 1))
        self.head = _cbr(16, 12, 1)
        self.fc = nn.Linear(12, 4)

    @staticmethod
    def shuffle(x, groups: int):
        b, c, h, w = x.shape
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = self.shuffle(torch.cat([x1, self.branch(x2)], 1), 2)
        return self.fc(self.head(x).mean((2, 3)))


class ConvNeXtish(nn.Module):
    """Depthwise conv, permute to channels-last, LayerNorm, MLP, layer scale, residual."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class MobileNetish(nn.Module):
    """Inverted residual with depthwise conv, a grouped conv (ResNeXt style) and SE."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.expand = _cbr(8, 24, 1)
        self.dw = _cbr(24, 24, 3, groups=24)
        self.se1, self.se2 = nn.Conv2d(24, 6, 1), nn.Conv2d(6, 24, 1)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.grouped = _cbr(8, 16, 3, groups=4)
        self.dw_mult = nn.Conv2d(16, 32, 3, 1, 1, groups=16)  # depth multiplier 2
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        x = x + self.project(y * s)
        x = self.dw_mult(self.grouped(x))
        return self.fc(x.mean((2, 3)))


class NormsNet(nn.Module):
    """GroupNorm, InstanceNorm, PReLU, transposed conv and max pooling."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(4, 12)
        self.act = nn.PReLU(12)
        self.c2, self.inorm = nn.Conv2d(12, 10, 3, padding=1), nn.InstanceNorm2d(10, affine=True)
        self.up = nn.ConvTranspose2d(10, 6, 2, stride=2)
        self.gn2 = nn.GroupNorm(2, 6, affine=False)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.gn(self.c1(x))), 2)
        x = self.up(F.relu(self.inorm(self.c2(x))))
        return self.out(F.relu(self.gn2(x)))


class TransformerMHA(nn.Module):
    """Pre-norm block with nn.MultiheadAttention (heads pruned with the stream) and an MLP."""

    def __init__(self, dim: int = 16, tokens: int = 6):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x) + self.pos
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


class AttentionHeads(nn.Module):
    """nn.MultiheadAttention on a norm-free residual stream (so removal is exact), self-attention
    with a packed projection and biases on k/v, then cross-attention with kdim/vdim != embed_dim
    in sequence-first layout."""

    def __init__(self, dim: int = 12, heads: int = 3, memory: int = 7):
        super().__init__()
        self.embed, self.mem = nn.Linear(5, dim), nn.Linear(5, memory)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_bias_kv=True)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=memory, vdim=memory)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h, m = self.embed(x), self.mem(x)
        h = h + self.attn(h, h, h)[0]
        t, mt = h.transpose(0, 1), m.transpose(0, 1)
        h = h + self.cross(t, mt, mt, need_weights=False)[0].transpose(0, 1)
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    """A bidirectional two-layer LSTM and a GRU reading features of a Linear (inputs pruned)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.lstm = nn.LSTM(12, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.mix = nn.Linear(12, 10)
        self.gru = nn.GRU(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lstm(torch.relu(self.embed(x)))[0]
        h = self.gru(torch.relu(self.mix(h)).transpose(0, 1))[0]
        return self.head(h[-1])


class LinearAttention(nn.Module):
    """Attention built from Linear layers and scaled_dot_product_attention, plus a class token."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(20, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 24), nn.ReLU(), nn.Linear(24, dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, idx):
        x = self.tok(idx)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        x = x + self.mlp(x)
        return self.head(x[:, 0])


class ControlFlowNet(nn.Module):
    """Loops, shape-dependent branches and a shared (reused) layer."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.blocks = nn.ModuleList(_cbr(8, 8) for _ in range(depth))
        self.shared = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for i, blk in enumerate(self.blocks):
            x = x + blk(x) if i % 2 == 0 else blk(x)
            if x.shape[-1] > 4:
                x = F.avg_pool2d(x, 2)
        x = self.shared(F.relu(self.shared(x)))
        return self.fc(x.amax(dim=(2, 3)))


class RollMaskNet(nn.Module):
    """A roll of the channels (which fixes them), a roll along H and a flip of the channels
    (which prune exactly), and where / masked_fill / clamp whose condition or bound comes from
    another conv (joined to the data's channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.gate = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.b, self.bound = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c, self.fc = nn.Conv2d(6, 4, 1), nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        y = torch.roll(self.a(x), 1, dims=1)
        g = self.gate(x)
        y = torch.where(g > 0, y, -0.5 * y).masked_fill(g < -1, 0.25)
        z = torch.roll(self.b(y), 1, dims=2).flip(1)
        z = torch.clamp(z, min=self.bound(x) - 0.5)
        return self.fc(torch.flip(self.c(z), dims=(1,)).flatten(1))


class ShuffleOfWidthOne(nn.Module):
    """Channel shuffle whose two groups are one channel each: view(b, 2, -1, h, w) with the 2
    written in the code. Removing either channel breaks the view; only probing can tell (so it
    is not in TOY_MODELS, whose groups all prune exactly)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        return self.b(y.view(b, 2, -1, h, w).transpose(1, 2).reshape(b, -1, h, w))


class TiedHead(nn.Module):
    """A language-model-like net whose output layer shares its embedding's weight (not in
    TOY_MODELS: channel removal refuses tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


class FusesInEval(nn.Module):
    """A module whose train()/eval() does work, as reparametrised blocks fuse their branches for
    inference: a mode given back by setting the flag leaves it fused under a training flag."""

    def __init__(self):
        super().__init__()
        self.conv, self.fused = nn.Conv2d(3, 3, 1), False

    def train(self, mode: bool = True):
        self.fused = not mode
        return super().train(mode)

    def forward(self, x):
        return self.conv(x)


TOY_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], object]]] = {
    "residual_projection": (ResidualNet, lambda: torch.randn(2, 3, 8, 8)),
    "residual_zeropad": (lambda: ResidualNet(zero_pad=True), lambda: torch.randn(2, 3, 8, 8)),
    "concat": (ConcatNet, lambda: torch.randn(2, 3, 4, 4)),
    "shuffle": (ShuffleNetish, lambda: torch.randn(2, 3, 6, 6)),
    "convnext": (ConvNeXtish, lambda: torch.randn(2, 3, 8, 8)),
    "mobilenet": (MobileNetish, lambda: torch.randn(2, 3, 6, 6)),
    "norms": (NormsNet, lambda: torch.randn(2, 3, 8, 8)),
    "transformer_mha": (TransformerMHA, lambda: torch.randn(2, 6, 5)),
    "linear_attention": (LinearAttention, lambda: torch.randint(0, 20, (2, 5))),
    "attention_heads": (AttentionHeads, lambda: torch.randn(2, 6, 5)),
    "recurrent": (Recurrent, lambda: torch.randn(2, 6, 5)),
    "control_flow": (ControlFlowNet, lambda: torch.randn(2, 3, 16, 16)),
    "roll_mask": (RollMaskNet, lambda: torch.randn(2, 3, 4, 4)),
}
