"""The tiny GPT-2 shared by the technique tests (random weights; a 1,000-token vocabulary keeps them fast)."""
import torch

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0)


def tiny_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY)).eval()


def ids(seed: int = 1, batch: int = 2, T: int = 16):
    return torch.randint(0, TINY["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(seed))
