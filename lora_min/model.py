"""GPT-2 with LoRA built in: the whole model in one file.

Read it top to bottom:
  1. GPTConfig, LoRAConfig  - the two configurations, checked when built.
  2. LoRA                   - the low-rank update  delta_h = (alpha / r) * B A x  (paper Eq. 3, §4.1).
  3. CausalSelfAttention    - GPT-2 attention, with LoRA on q, k, v (separately) and the output.
  4. MLP, Block             - the rest of a transformer block, exactly as GPT-2 has it.
  5. KVCache                - past keys and values, so decoding feeds one new token per step.
  6. GPT                    - embeddings, blocks, tied LM head, merging, loading official weights.

Module names match the official Hugging Face checkpoints (`wte`, `h.0.attn.c_attn`, ...), so
loading them is a matter of transposing four matrices per block (see `GPT.load_base_weights`).

Reference: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
Radford et al., 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# 1. Configurations

# The four published sizes. Every one uses 64-dimensional attention heads.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

LORA_TARGETS = ("q", "k", "v", "o")  # query, key, value, attention output projection


@dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    block_size: int = 1024  # longest sequence, i.e. rows of the position embedding
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """The configuration of an official size: 'gpt2', 'gpt2-medium', 'gpt2-large' or 'gpt2-xl'."""
        if name not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {sorted(GPT2_SIZES)}")
        return cls(**{**GPT2_SIZES[name], **overrides})

    def size_name(self) -> str | None:
        """The official size with this shape ('gpt2', ... 'gpt2-xl'), or None for any other shape."""
        shape = dict(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)
        return next((name for name, dims in GPT2_SIZES.items() if dims == shape), None)


@dataclass
class LoRAConfig:
    r: int = 4  # rank of the update; the paper's E2E runs use 4 (Table 11)
    alpha: float = 32  # the update is scaled by alpha / r (§4.1)
    dropout: float = 0.1  # dropout on the input of A, as in microsoft/LoRA's E2E recipe
    targets: tuple[str, ...] = ("q", "v")  # which projections get an update; q and v is the paper's default

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"LoRAConfig.targets must be distinct entries of {LORA_TARGETS}, got {self.targets!r}"
            )

    @property
    def scale(self) -> float:
        # Dividing by r means that when you change the rank you need not re-tune the learning
        # rate: alpha is set once and kept (§4.1).
        return self.alpha / self.r


# -----------------------------------------------------------------------------
# 2. The LoRA update


class LoRA(nn.Module):
    """The trainable low-rank update of one frozen projection W0 (out x in).

    h = W0 x + (alpha / r) * B A x,  with A: (r, in) and B: (out, r)

    (paper Eq. 3 is h = W0 x + B A x; the scaling by alpha / r is §4.1's.)

    B starts at zero, so at initialisation B A = 0 and the model is exactly the pretrained one;
    A starts like an nn.Linear weight (Kaiming-uniform) so gradients reach B from the first step.
    """

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(config.r, in_features))
        self.B = nn.Parameter(torch.empty(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout)
        self.scale = config.scale
        self.merged = False  # True while scale * B A is folded into W0 (see GPT.merge_lora)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # what nn.Linear.reset_parameters does
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out). Two thin matmuls, never the full (out x in) product.
        return (self.dropout(x) @ self.A.t() @ self.B.t()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, the (out, in) matrix this update adds to W0, computed in float32."""
        return self.scale * (self.B.float() @ self.A.float())


# -----------------------------------------------------------------------------
# 3. Attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, lora: LoRAConfig | None, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        # GPT-2 keeps q, k and v in one fused projection; its output rows are [q | k | v].
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        # One separate update per target, even for q, k, v inside the fused c_attn: adapting q and v
        # alone (the paper's choice) needs that (§4.2, Table 5).
        targets = lora.targets if lora is not None else ()
        self.lora = nn.ModuleDict({t: LoRA(config.n_embd, config.n_embd, lora) for t in targets})

    def adapt(self, target: str, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x  ->  W0 x + scale * B A x, when `target` is adapted and not merged."""
        update = self.lora[target] if target in self.lora else None
        if update is None or update.merged:
            return h
        return h + update(x)

    def base_weight(self, target: str) -> torch.Tensor:
        """The (n_embd, n_embd) block of a base weight that `target` adapts (a view, not a copy)."""
        if target == "o":
            return self.c_proj.weight
        i = "qkv".index(target)
        return self.c_attn.weight[i * self.n_embd : (i + 1) * self.n_embd]

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = self.adapt("q", q, x), self.adapt("k", k, x), self.adapt("v", v, x)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_head, past + T, head_dim)
        # Without a mask every query sees itself and the keys before it (plain causal attention);
        # with one (padding, or a cache) the mask says exactly which keys each query may see.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and cache is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.adapt("o", self.c_proj(y), y))


# -----------------------------------------------------------------------------
# 4. MLP and block


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, lora: LoRAConfig | None, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config, lora, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# 5. KV cache


class KVCache:
    """The keys and values of every layer for all tokens seen so far.

    When decoding, token t's keys and values never change once computed, so we keep them and
    feed the model only the new token: each step costs O(T) instead of re-running O(T^2).
    Memory is allocated once for `max_len` tokens; `length` says how many are filled.
    `key_mask` marks which of those positions are real tokens (False for left padding).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, n_head, T, head_dim) keys/values; return all of them so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (in that order), e.g. the beams that survive a beam-search step.
        Only the filled positions are copied: the rest of the buffer holds nothing yet."""
        filled = slice(0, self.length)
        k, v = (t.new_empty(t.size(0), len(rows), *t.shape[2:]) for t in (self.k, self.v))
        torch.index_select(self.k[:, :, :, filled], 1, rows, out=k[:, :, :, filled])
        torch.index_select(self.v[:, :, :, filled], 1, rows, out=v[:, :, :, filled])
        self.k, self.v, self.key_mask = k, v, self.key_mask.index_select(0, rows)


def build_attn_mask(key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask for T new queries over S keys, the last T of which are theirs.

    Query i may see key j when j is not padding and j <= S - T + i (causal).
    """
    B, S = key_mask.shape
    T = n_query
    causal = torch.ones(T, S, dtype=torch.bool, device=key_mask.device).tril(diagonal=S - T)
    mask = causal & key_mask[:, None, None, :]
    # A padding query would see no key at all and softmax would give 0/0 = NaN. Let every query
    # see itself; padding outputs are never used, and real queries lose nothing.
    mask[..., S - T :] |= torch.eye(T, dtype=torch.bool, device=key_mask.device)
    return mask


def positions_and_mask(idx: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids, (1, T) or (B, T), of the T new tokens in idx, and the attention mask for them
    (None: plain causal attention). With a cache, records which of the new keys are real tokens."""
    B, T = idx.shape
    past = cache.length if cache is not None else 0
    # Which keys are real tokens: all of them, unless the caller padded.
    key_mask = None
    if cache is not None:
        new = attention_mask.bool() if attention_mask is not None else idx.new_ones(B, T, dtype=torch.bool)
        cache.key_mask[:, past : past + T] = new
        key_mask = cache.key_mask[:, : past + T]
    elif attention_mask is not None:
        key_mask = attention_mask.bool()

    if key_mask is None:
        return torch.arange(past, past + T, device=idx.device).unsqueeze(0), None  # (1, T)
    # Positions count real tokens only, so a left-padded prompt is positioned exactly
    # like the same prompt without padding.
    pos = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -T:]  # (B, T)
    return pos, build_attn_mask(key_mask, T)


# -----------------------------------------------------------------------------
# 6. The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, lora: LoRAConfig | None = None):
        super().__init__()
        self.config = config
        self.lora_config = lora
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, lora, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        # The LM head shares its weight with the token embedding (weight tying, as in GPT-2).
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory
        # Named adapters kept beside the active one, and its name (see lora_min/adapters.py). A plain
        # dict: a resident adapter's tensors are not parameters of the model.
        self.resident_adapters: dict = {}
        self.active_adapter: str | None = None
        # Each weight W, (out, in), lies in memory as its transpose, (in, out), the layout GPT-2's
        # own Conv1D uses: x W^T then reads W^T row by row, which MKL runs 1.1-1.7x faster for the
        # 1-80 rows of a decoding step (benchmarks/decode.py). Shapes and values are those of
        # nn.Linear; no memory is added. The tied embedding reads its rows strided, a few per step.
        for module in [self.wte, *(m for m in self.h.modules() if isinstance(m, nn.Linear))]:
            module.weight = nn.Parameter(module.weight.detach().t().contiguous().t())
        self.lm_head.weight = self.wte.weight

        self._init_base_weights()
        if lora is not None:
            # LoRA freezes every pretrained weight; only the A and B matrices learn (§4.1).
            for name, param in self.named_parameters():
                param.requires_grad = is_lora_param(name)

    def _init_base_weights(self) -> None:
        # GPT-2's initialisation, used when training from scratch (the tutorials do that);
        # from_pretrained overwrites it. LoRA's A and B initialise themselves (see LoRA).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Projections that write into the residual stream get 1/sqrt(2 * n_layer) of that
        # (Radford et al., 2019, §2.3): each block adds two of them.
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits.

        idx:            (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens and 0 for left padding (decoding in batches).
        cache:          a KVCache; idx then holds only the new tokens, and the cache grows by T.
        logits_mask:    (B, T) bool; if given, logits only where it is True, shape (N, vocab).
                        Training needs logits only where there is loss: skipping the
                        50257-wide LM head at prompt and padding positions saves time and memory.
        Returns (B, T, vocab) logits, or (N, vocab) with logits_mask.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")

        pos, attn_mask = positions_and_mask(idx, attention_mask, cache)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, n_embd)
        for block in self.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, cache, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if logits_mask is not None:
            x = x[logits_mask]  # (N, n_embd): only the positions that need logits
        return self.lm_head(x)

    # --- merging (§4.1: no additional inference latency) ---------------------------------

    def lora_updates(self):
        """(attention module, target name, LoRA module) for every adapted projection."""
        for block in self.h:
            for target, update in block.attn.lora.items():
                yield block.attn, target, update

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold scale * B A into W0 so inference costs exactly what the base model costs.

        The sum is formed in float32 even for a half-precision model, then rounded once.
        Merging a merged model is a no-op (never a double add).
        """
        for attn, target, update in self.lora_updates():
            if not update.merged:
                weight = attn.base_weight(target)
                weight.copy_((weight.float() + update.delta_weight()).to(weight.dtype))
                update.merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Take scale * B A back out of W0 (restores it up to rounding). A no-op when not merged."""
        for attn, target, update in self.lora_updates():
            if update.merged:
                weight = attn.base_weight(target)
                weight.copy_((weight.float() - update.delta_weight()).to(weight.dtype))
                update.merged = False

    # --- mixed precision ----------------------------------------------------------------

    def cast_frozen_base(self, dtype: torch.dtype) -> None:
        """Keep every frozen nn.Linear (weight and bias) in `dtype`, bf16 or fp16, for training or
        decoding under autocast to that dtype: the matmuls see the very same numbers.

        Autocast caches its casts only for weights that require grad, so it would re-cast each
        frozen float32 weight at every forward (gpt2-medium: ~2 GB of memory traffic per step)
        and keep the copies for backward (24 MiB per layer). What trains stays float32, and so
        does its optimizer state: LoRA's A and B (with full fine-tuning nothing is frozen, and
        this does nothing). LayerNorms, the position embedding and so the residual stream stay
        float32; the token embedding, tied to the LM head, is looked up in `dtype`.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.to(dtype)  # in place: the LM head stays tied to the token embedding

    def compute_dtype(self) -> torch.dtype:
        """The dtype attention computes keys and values in: autocast's when it is on (for our
        device), else the weights'. A KVCache holds them in it: a float32 cache under bf16
        autocast would take twice the memory and be re-cast whole at every decoding step."""
        device_type = self.wte.weight.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.wte.weight.dtype

    # --- loading the official checkpoints ------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, lora: LoRAConfig | None = None, cache_dir: str | Path | None = None
    ) -> GPT:
        """Load official GPT-2 weights: a name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'),
        downloaded once from the Hugging Face hub, or a local model.safetensors /
        pytorch_model.bin file or a folder holding one."""
        from lora_min.weights import config_for_checkpoint, load_checkpoint, resolve_checkpoint

        path = resolve_checkpoint(str(name_or_path), cache_dir)
        state = load_checkpoint(path)
        # Build on the meta device: no memory and no random initialisation, which would take
        # seconds for gpt2-xl only to be overwritten. Then allocate, load, and initialise LoRA.
        with torch.device("meta"):
            model = cls(config_for_checkpoint(path, state), lora)
        model.to_empty(device="cpu")
        model.lm_head.weight = model.wte.weight  # to_empty gives each a tensor of its own: re-tie
        model.load_base_weights(state, source=str(path))
        for _, _, update in model.lora_updates():
            update.reset_parameters()
        return model

    @torch.no_grad()
    def load_base_weights(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy an official GPT-2 state dict (transformers' key names) into this model.

        The official checkpoints come from a Conv1D layer that stores weights as (in, out);
        nn.Linear stores (out, in), so those four matrices per block are transposed.
        """
        from lora_min.weights import checked_base_state

        own = {k: v for k, v in self.state_dict().items() if not is_lora_param(k) and k != "lm_head.weight"}
        for key, value in checked_base_state(state, own, source, self.config).items():  # our names, shapes checked
            own[key].copy_(value.t() if key.endswith(CONV1D_WEIGHTS) else value)


# Names of the official Conv1D weights, stored (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_lora_param(name: str) -> bool:
    return ".lora." in name


# -----------------------------------------------------------------------------
# Helpers for training code


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (A and B of every adapted projection): what an adapter file holds."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that receive gradients (each counted once, even if shared)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
