"""Quantizer of the stand-in: builds its codebook and usage counter directly on `device`, and
quantizes the difference of the encoded last and first tokens, as the published NSVQ does."""
import torch
import torch.nn as nn


class NSVQ(nn.Module):
    def __init__(self, dim, num_embeddings, embedding_dim, device=torch.device("cpu"),
                 code_seq_len=1):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.code_seq_len = \
            num_embeddings, embedding_dim, code_seq_len
        self.project_in = nn.Linear(dim, embedding_dim)
        self.project_out = nn.Linear(embedding_dim, dim)
        self.codebooks = nn.Parameter(torch.randn(num_embeddings, embedding_dim, device=device))
        self.codebooks_used = torch.zeros(num_embeddings, dtype=torch.int32, device=device)

    def encode(self, tokens, batch_size):
        return self.project_in(tokens).reshape(-1, self.embedding_dim)      # (B * L, quant_dim)

    def _quantize(self, first, last):
        batch = first.shape[0]
        first, last = self.encode(first, batch), self.encode(last, batch)   # published order
        action = last - first
        idx = torch.cdist(action, self.codebooks).argmin(-1)
        return self.project_out(self.codebooks[idx]).reshape(batch, -1, self.project_out.out_features), \
            idx.reshape(batch, -1)

    def forward(self, first, last):
        quantized, idx = self._quantize(first, last)
        # the training path counts (and may reset) codes, as the published quantizer does
        self.codebooks_used += torch.bincount(idx.flatten(), minlength=self.num_embeddings).int()
        return quantized, idx

    def inference(self, first, last):
        return self._quantize(first, last)
