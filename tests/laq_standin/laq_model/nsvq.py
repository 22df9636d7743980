"""Quantizer of the stand-in: builds its codebook and usage counter directly on `device`."""
import torch
import torch.nn as nn


class NSVQ(nn.Module):
    def __init__(self, dim, num_embeddings, embedding_dim, device=torch.device("cpu"),
                 code_seq_len=1):
        super().__init__()
        self.num_embeddings, self.code_seq_len = num_embeddings, code_seq_len
        self.project_in = nn.Linear(dim, embedding_dim)
        self.project_out = nn.Linear(embedding_dim, dim)
        self.codebooks = nn.Parameter(torch.randn(num_embeddings, embedding_dim, device=device))
        self.codebooks_used = torch.zeros(num_embeddings, dtype=torch.int32, device=device)

    def codes(self, x):
        z = self.project_in(x)                                   # (B, L, quant_dim)
        dist = torch.cdist(z, self.codebooks[None].expand(len(z), -1, -1))
        return dist.argmin(-1)

    def forward(self, x):
        idx = self.codes(x)
        # the training path resets unused codes, as the published quantizer may
        self.codebooks_used += torch.bincount(idx.flatten(), minlength=self.num_embeddings).int()
        return self.project_out(self.codebooks[idx]), idx

    def inference(self, x):
        idx = self.codes(x)
        return self.project_out(self.codebooks[idx]), idx
