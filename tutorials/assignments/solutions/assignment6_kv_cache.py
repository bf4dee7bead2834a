"""Assignment 6: attention with a KV cache.

When a model generates text, token t's keys and values never change once computed. A KV cache
keeps them, so each step feeds the model only the new token: its query attends over all the
cached keys. For that, attention must handle T queries that are the *last* T of S positions:

    query i (position S - T + i) may see keys 0, 1, ..., S - T + i   (causal, offset)

    out = softmax(q k^T / sqrt(D) with the unseen keys masked out) v

Fill in the two pieces marked YOUR CODE HERE (replace the `raise NotImplementedError` lines).
Do not call F.scaled_dot_product_attention: the grader compares against it. Check with

    python grade.py assignment6 assignment6_kv_cache.py

lora_min/model.py's KVCache preallocates its memory instead of concatenating; the result is
the same.
"""
import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, H, S, D) with S >= T. Returns (B, H, T, D)."""
    # BEGIN SOLUTION
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, H, T, S)
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # softmax subtracts the row max: stable
    # END SOLUTION


class KVCache:
    """The keys and values of one attention layer for every position so far."""

    def __init__(self):
        self.k = None  # (B, H, S, D) once something is stored
        self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H, T, D) keys and values after the old ones; return all of them."""
        # BEGIN SOLUTION
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v
        # END SOLUTION
