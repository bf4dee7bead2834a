"""lora-min: a minimal, from-scratch GPT-2 with LoRA built in (Hu et al., 2021)."""

from lora_min.model import GPT, GPTConfig, KVCache, LoRAConfig, count_trainable, lora_state_dict

__all__ = ["GPT", "GPTConfig", "KVCache", "LoRAConfig", "count_trainable", "lora_state_dict"]
