"""Stand-in LatentActionQuantization: same constructor, input/output contract and loading
behaviour as the published model, with a small MLP instead of the transformers."""
import torch
import torch.nn as nn
from beartype import beartype
from einops import rearrange

from laq_model.nsvq import NSVQ


class LatentActionQuantization(nn.Module):
    @beartype
    def __init__(self, *, dim, quant_dim, codebook_size, image_size, patch_size, spatial_depth,
                 temporal_depth, dim_head=64, heads=8, channels=3, attn_dropout=0.,
                 ff_dropout=0., code_seq_len=1):
        super().__init__()
        assert image_size % patch_size == 0
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid = image_size // patch_size
        patch_dim = channels * patch_size ** 2
        self.to_patch = nn.Linear(patch_dim, dim)
        self.enc = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.GELU())
                                   for _ in range(spatial_depth)])
        self.to_action = nn.Linear(2 * dim, dim)
        self.temporal = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.GELU())
                                        for _ in range(temporal_depth)])
        self.pool = nn.AdaptiveAvgPool1d(code_seq_len)
        self.vq = NSVQ(dim=dim, num_embeddings=codebook_size, embedding_dim=quant_dim,
                       device="cuda", code_seq_len=code_seq_len)
        self.dec = nn.Linear(2 * dim, patch_dim)

    def _patches(self, frame):
        return self.to_patch(rearrange(frame, "b c (h p1) (w p2) -> b (h w) (c p1 p2)",
                                       p1=self.patch_size, p2=self.patch_size))

    def _encode(self, video):
        """(first frame's tokens (B, N, dim), first and last tokens pooled to (B, L, dim))."""
        first, second = self.enc(self._patches(video[:, :, 0])), self.enc(self._patches(video[:, :, 1]))
        joint = self.temporal(self.to_action(torch.cat([first, second], -1)))   # (B, N, dim)
        pool = lambda t: self.pool(t.transpose(1, 2)).transpose(1, 2)  # noqa: E731
        return first, pool(first), pool(joint)

    def _decode(self, first, action):
        action = action.mean(1, keepdim=True).expand(-1, first.shape[1], -1)
        patches = self.dec(torch.cat([first, action], -1))
        return rearrange(patches, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=self.grid,
                         p1=self.patch_size, p2=self.patch_size)

    def forward(self, video):
        first, first_tokens, last_tokens = self._encode(video)
        quantized, _ = self.vq(first_tokens, last_tokens)
        return (self._decode(first, quantized) - video[:, :, 1]).abs().mean()

    @torch.no_grad()
    def inference(self, video, step=0, return_only_codebook_ids=False):
        first, first_tokens, last_tokens = self._encode(video)
        quantized, idx = self.vq.inference(first_tokens, last_tokens)
        if return_only_codebook_ids:
            return idx
        return self._decode(first, quantized)

    def load(self, path):
        state = torch.load(path, map_location="cpu")
        self.load_state_dict(state, strict=False)       # non-strict, as published
