"""The yardstick of `bench train`: a compact nanoGPT-style GPT-2, the model anyone can write in an afternoon.

nn.Linear layers, one fused c_attn matmul per block, SDPA (is_causal), GELU (tanh), LayerNorm, no dropout, the
lm_head tied to the token embedding with the vocabulary padded to a multiple of 128 (50257 -> 50304), nanoGPT's
init (normal 0.02; the residual projections c_proj 0.02 / sqrt(2 * n_layer)) and nanoGPT's optimizer
(`configure_optimizer`: AdamW, matrices decay, biases/LayerNorms don't, fused on CUDA). Built from a transformers
GPT2Config; independent of gpt2opt_lib.model on purpose (its own weights, its own code): the project's native
model has to beat it, not copy it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
    return vocab_size + (-vocab_size) % VOCAB_MULTIPLE


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_inner: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = MLP(n_embd, n_inner)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        """config: a transformers GPT2Config (n_layer, n_head, n_embd, n_positions, vocab_size, n_inner)."""
        super().__init__()
        C = config.n_embd
        self.config = config
        self.vocab_size = config.vocab_size
        self.padded_vocab = padded_vocab(config.vocab_size)
        eps = getattr(config, "layer_norm_epsilon", 1e-5)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab, C),
            wpe=nn.Embedding(config.n_positions, C),
            h=nn.ModuleList(Block(C, config.n_head, config.n_inner or 4 * C, eps) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(C, eps=eps)))
        self.lm_head = nn.Linear(C, self.padded_vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight              # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):                          # residual projections (GPT-2 paper)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, padded_vocab), and the mean cross-entropy against `targets` (B, T) when
        given (a target of -1 is ignored), else None."""
        T = idx.shape[1]
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """nanoGPT's AdamW: every >= 2-D parameter (matmul weights, embeddings) decays, biases and LayerNorms don't;
    fused on CUDA, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if params and all(p.is_cuda for p in params):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
