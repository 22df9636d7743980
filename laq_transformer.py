"""The transformer LAQ (LAPA's latent action quantization) is built from, written for this project
from the architecture it publishes, with the two places where LAPA's code computes something
else than its description as switches (docs/latent_actions.md, "LAQ, exactly"):

- `keys_from="input"`: self-attention takes its keys and values from the layer's input before
  the LayerNorm (LAPA's code); `"norm"` from the normalised input, as its queries.
- `peg_layout="memory"`: the temporal stack's position-generating conv reads its tokens, held as
  ((b h w), t, d), as if their memory were (b, t, h, w, d) (LAPA's code); `"grid"` puts each token
  at its own (t, h, w).

Every other LayerNorm but the feed-forward's has a gain and no bias (LAQ's `gamma`; its zero
`beta` is a buffer that never changes), and the feed-forward's is torch's, with a bias.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class GainNorm(nn.Module):
    """LayerNorm with a learned gain and no bias."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gain)


class PEG(nn.Module):
    """Position-generating depthwise 3x3x3 conv over (t, h, w), zero-padded, causal in time."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, grid):                       # (B, t, h, w, d)
        x = F.pad(grid.permute(0, 4, 1, 2, 3), (1, 1, 1, 1, 2, 0))
        return self.conv(x).permute(0, 2, 3, 4, 1)


class Attention(nn.Module):
    """Cosine-similarity attention: q and k L2-normalised, learned per-dim scales, a fixed
    scale of 8. Cross-attention normalises its context and prepends `num_null_kv` learned key /
    value pairs, held as LAQ holds them: (heads, 2 * n, dim_head), key i in row 2i, value i in
    row 2i + 1. `unused_context_gain`: LAQ's self-attention holds a context norm it never uses;
    a twin that loads and writes LAQ's checkpoints holds it too, frozen."""

    def __init__(self, dim, dim_head, heads, cross=False, keys_from="norm", num_null_kv=2,
                 unused_context_gain=False):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head, self.keys_from = heads, dim_head, keys_from
        self.norm = GainNorm(dim)
        self.context_norm = GainNorm(dim) if cross else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.null_kv = nn.Parameter(torch.randn(heads, 2 * num_null_kv, dim_head)) if cross else None
        self.to_out = nn.Linear(inner, dim, bias=False)
        if unused_context_gain and not cross:
            self.unused_context_gain = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x, context=None, bias=None):
        b = x.shape[0]
        normed = self.norm(x)
        if self.context_norm is not None:
            context = self.context_norm(context)
        else:
            context = x if self.keys_from == "input" else normed
        split = lambda t: t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(normed))
        k, v = (split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        if self.null_kv is not None:
            null = self.null_kv.to(k.dtype).expand(b, -1, -1, -1)
            k, v = torch.cat([null[:, :, 0::2], k], dim=2), torch.cat([null[:, :, 1::2], v], dim=2)
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else
                                             bias.to(q.dtype), scale=8.0)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class FeedForward(nn.Module):
    """LayerNorm (with a bias, as LAQ's) -> Linear -> GEGLU -> Linear, inner width
    int(4 * 2/3 * dim), no biases in the Linears."""

    def __init__(self, dim):
        super().__init__()
        inner = int(4 * 2 / 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * inner, bias=False)
        self.proj_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        h, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class Transformer(nn.Module):
    """`depth` layers of x + PEG(x), x + SelfAttn(x), [x + CrossAttn(x, context)], x + FF(x),
    then a GainNorm. `axis` says how tokens are held: "space" ((B t), (h w), d) or "time"
    ((B h w), t, d); `peg_layout` where the PEG finds them on the (t, h, w) grid."""

    def __init__(self, dim, depth, dim_head, heads, axis, cross=False, keys_from="norm",
                 peg_layout="grid", unused_context_gain=False):
        super().__init__()
        self.axis, self.peg_layout = axis, peg_layout
        self.layers = nn.ModuleList(nn.ModuleDict({
            "peg": PEG(dim),
            "attn": Attention(dim, dim_head, heads, keys_from=keys_from,
                              unused_context_gain=unused_context_gain),
            **({"cross": Attention(dim, dim_head, heads, cross=True)} if cross else {}),
            "ff": FeedForward(dim)}) for _ in range(depth))
        self.norm_out = GainNorm(dim)

    def to_grid(self, x, shape):
        """Tokens as this stack holds them -> (B, t, h, w, d)."""
        b, t, h, w = shape
        if self.axis == "space" or self.peg_layout == "memory":
            return x.reshape(b, t, h, w, -1)
        return x.reshape(b, h, w, t, -1).permute(0, 3, 1, 2, 4)

    def from_grid(self, grid):
        """(B, t, h, w, d) -> tokens as this stack holds them (the inverse of to_grid)."""
        b, t, h, w, d = grid.shape
        if self.axis == "space":
            return grid.reshape(b * t, h * w, d)
        if self.peg_layout == "memory":
            return grid.reshape(b * h * w, t, d)
        return grid.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)

    def forward(self, x, shape, bias=None, context=None):
        for layer in self.layers:
            x = x + self.from_grid(layer["peg"](self.to_grid(x, shape)))
            x = x + layer["attn"](x, bias=bias)
            if "cross" in layer:
                x = x + layer["cross"](x, context=context)
            x = x + layer["ff"](x)
        return self.norm_out(x)

    def tokens_of(self, grid):
        """(B, t, h, w, d) -> tokens in this stack's axis order (not the PEG's view)."""
        b, t, h, w, d = grid.shape
        if self.axis == "space":
            return grid.reshape(b * t, h * w, d)
        return grid.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)

    def grid_of(self, x, shape):
        """Tokens in this stack's axis order -> (B, t, h, w, d)."""
        b, t, h, w = shape
        if self.axis == "space":
            return x.reshape(b, t, h, w, -1)
        return x.reshape(b, h, w, t, -1).permute(0, 3, 1, 2, 4)


class PositionBias(nn.Module):
    """Continuous relative position bias: an MLP on log-scaled (dy, dx), one value per head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim),
                                 nn.LeakyReLU(0.1), nn.Linear(dim, heads))

    def forward(self, h, w, device):
        dy, dx = torch.meshgrid(torch.arange(-h + 1, h, device=device),
                                torch.arange(-w + 1, w, device=device), indexing="ij")
        rel = torch.stack([dy, dx], dim=-1).float()
        table = self.mlp(torch.sign(rel) * torch.log1p(rel.abs()))        # (2h-1, 2w-1, heads)
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        bias = table[ys[:, None] - ys[None] + h - 1, xs[:, None] - xs[None] + w - 1]
        return bias.permute(2, 0, 1)                                       # (heads, n, n)
