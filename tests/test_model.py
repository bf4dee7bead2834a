"""The LoRA math of lora_min.model, property-based over random tiny configs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_min.model import GPT, GPTConfig, KVCache, LoRA, LoRAConfig, count_trainable, lora_state_dict

TARGET_SETS = st.lists(st.sampled_from(["q", "k", "v", "o"]), min_size=1, max_size=4, unique=True)


@st.composite
def configs(draw):
    n_head = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8]))
    config = GPTConfig(
        n_layer=draw(st.integers(1, 3)), n_head=n_head, n_embd=n_head * head_dim,
        vocab_size=draw(st.integers(5, 64)), block_size=32,
    )
    lora = LoRAConfig(
        r=draw(st.integers(1, 8)), alpha=draw(st.floats(0.5, 64)), dropout=0.0,
        targets=tuple(draw(TARGET_SETS)),
    )
    return config, lora


def random_tokens(config: GPTConfig, seed: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


def randomize_lora(model: GPT, seed: int) -> None:
    """Non-zero A and B everywhere, so the update really changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, update in model.lora_updates():
            update.A.copy_(torch.randn(update.A.shape, generator=g) * 0.2)
            update.B.copy_(torch.randn(update.B.shape, generator=g) * 0.2)


def base_and_lora(config: GPTConfig, lora: LoRAConfig, seed: int = 0) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    base = GPT(config).eval()
    adapted = GPT(config, lora).eval()
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".lora." in k for k in missing)
    return base, adapted


@given(configs(), st.integers(1, 3), st.integers(1, 16), st.integers(0, 2**16))
def test_fresh_lora_model_equals_base_model_exactly(cfg, batch, length, seed):
    """Paper §4.1: B = 0 at initialisation, so B A x = 0 and nothing changes."""
    config, lora = cfg
    base, adapted = base_and_lora(config, lora, seed)
    idx = random_tokens(config, seed, batch, length)
    with torch.no_grad():
        assert torch.equal(base(idx), adapted(idx))


@given(configs(), st.integers(1, 3), st.integers(1, 16), st.integers(0, 2**16))
def test_merged_equals_unmerged_and_unmerge_restores(cfg, batch, length, seed):
    config, lora = cfg
    _, model = base_and_lora(config, lora, seed)
    randomize_lora(model, seed)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    idx = random_tokens(config, seed, batch, length)
    with torch.no_grad():
        unmerged = model(idx)
        model.merge_lora()
        merged = model(idx)
        model.merge_lora()  # merging twice is a no-op, never a double add
        assert torch.equal(model(idx), merged)
    # float32: the two orders of summation differ by rounding only, which grows with the update's
    # size (alpha / r up to 64 here).
    torch.testing.assert_close(merged, unmerged, atol=1e-5 * max(1.0, lora.scale), rtol=1e-4)
    model.unmerge_lora()
    model.unmerge_lora()  # a no-op too
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_merge_changes_exactly_the_adapted_blocks_of_c_attn():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11, block_size=8)
    model = GPT(config, LoRAConfig(r=2, targets=("k",)))
    randomize_lora(model, 0)
    before = model.h[0].attn.c_attn.weight.detach().clone()
    model.merge_lora()
    after = model.h[0].attn.c_attn.weight.detach()
    update = model.h[0].attn.lora["k"]
    assert torch.equal(after[:8], before[:8]) and torch.equal(after[16:], before[16:])  # q, v untouched
    torch.testing.assert_close(after[8:16], before[8:16] + update.scale * update.B @ update.A)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_in_half_precision_sums_in_float32(dtype):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=11, block_size=8)
    model = GPT(config, LoRAConfig(r=4, targets=("q", "o")))
    randomize_lora(model, 1)
    model.to(dtype)
    attn = model.h[0].attn
    expected_q = (attn.c_attn.weight[:16].float() + attn.lora["q"].delta_weight()).to(dtype)
    expected_o = (attn.c_proj.weight.float() + attn.lora["o"].delta_weight()).to(dtype)
    model.merge_lora()
    assert torch.equal(attn.c_attn.weight[:16], expected_q)
    assert torch.equal(attn.c_proj.weight, expected_o)


@given(configs())
def test_trainable_parameters_are_exactly_the_lora_matrices(cfg):
    config, lora = cfg
    model = GPT(config, lora)
    # Each adapted projection is n_embd -> n_embd: A is (r, n_embd) and B is (n_embd, r).
    expected = config.n_layer * len(lora.targets) * 2 * lora.r * config.n_embd
    assert count_trainable(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert all(n.endswith((".A", ".B")) for n in trainable)


@given(configs(), st.integers(0, 2**16))
def test_one_optimizer_step_changes_only_lora_tensors(cfg, seed):
    config, lora = cfg
    _, model = base_and_lora(config, lora, seed)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    idx = random_tokens(config, seed, 2, 8)
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(lora_state_dict(model))
    assert any(k.endswith(".B") for k in changed)  # B moves first: its gradient is A x, non-zero


def test_lora_dropout_applies_to_the_input_of_A_only_in_training():
    """Training: scale * B A dropout(x), with the very draws nn.Dropout makes (not dropout on the
    output, nor on W0 x); evaluation: scale * B A x."""
    torch.manual_seed(0)
    update = LoRA(6, 5, LoRAConfig(r=2, alpha=4, dropout=0.5))
    torch.nn.init.normal_(update.B)
    x = torch.randn(3, 4, 6)
    update.train()
    torch.manual_seed(1)
    trained = update(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the same random draws
    assert (dropped == 0).any() and not torch.equal(dropped, x)
    torch.testing.assert_close(trained, dropped @ update.A.T @ update.B.T * update.scale)
    update.eval()
    torch.testing.assert_close(update(x), x @ update.A.T @ update.B.T * update.scale)

    # In the model, only the LoRA path is dropped: with B = 0 a training forward is the base model's.
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=7, block_size=8)
    model = GPT(config, LoRAConfig(r=2, dropout=0.9, targets=("q", "v")))
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model.train()(idx), model.eval()(idx))


@given(configs(), st.booleans(), st.integers(1, 3), st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**16))
def test_kv_cache_gives_the_full_forward_logits(cfg, merged, batch, prompt_len, new_len, seed):
    config, lora = cfg
    _, model = base_and_lora(config, lora, seed)
    randomize_lora(model, seed)
    if merged:
        model.merge_lora()
    idx = random_tokens(config, seed, batch, prompt_len + new_len)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(config, batch, prompt_len + new_len)
        steps = [model(idx[:, :prompt_len], cache=cache)]
        steps += [model(idx[:, t : t + 1], cache=cache) for t in range(prompt_len, idx.size(1))]
    assert cache.length == idx.size(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@given(configs(), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**16))
def test_left_padding_does_not_change_a_rows_logits(cfg, n_pad, length, seed):
    config, lora = cfg
    _, model = base_and_lora(config, lora, seed)
    randomize_lora(model, seed)
    row = random_tokens(config, seed, 1, length)
    padded = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, n_pad), torch.ones(1, length)], dim=1).long()
    with torch.no_grad():
        alone = model(row)
        with_padding = model(padded, attention_mask=mask)
        # ... and with a cache, decoding one more token after the padded prompt.
        cache = KVCache(config, 1, n_pad + length + 1)
        model(padded, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[1 % config.vocab_size]])
        step = model(nxt, cache=cache)
        expected_step = model(torch.cat([row, nxt], dim=1))[:, -1:]
    assert not with_padding.isnan().any()
    torch.testing.assert_close(with_padding[:, n_pad:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step, expected_step, atol=1e-5, rtol=1e-4)


def test_logits_mask_returns_only_the_selected_positions():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=13, block_size=16)
    model = GPT(config).eval()
    idx = random_tokens(config, 0, 2, 6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 5] = True
    with torch.no_grad():
        torch.testing.assert_close(model(idx, logits_mask=mask), model(idx)[mask])


def test_gradient_checkpointing_gives_the_same_gradients():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=13, block_size=16)
    model = GPT(config, LoRAConfig(r=2, dropout=0.0))
    randomize_lora(model, 0)
    idx = random_tokens(config, 0, 2, 6)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(idx).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_sequence_longer_than_block_size_is_refused():
    config = GPTConfig(n_layer=1, n_head=1, n_embd=4, vocab_size=5, block_size=4)
    with pytest.raises(ValueError, match="block_size 4"):
        GPT(config)(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_layer=0, n_head=1, n_embd=4), "n_layer"),
        (dict(n_layer=1, n_head=3, n_embd=4), "n_embd"),
        (dict(n_layer=1, n_head=1, n_embd=4, vocab_size=-1), "vocab_size"),
        (dict(n_layer=1, n_head=1, n_embd=4, dropout=1.5), "dropout"),
    ],
)
def test_bad_gpt_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets=("q", "x")), "targets"),
        (dict(targets=()), "targets"),
        (dict(targets=("q", "q")), "targets"),
    ],
)
def test_bad_lora_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
        LoRAConfig(**kwargs)


def test_official_sizes_by_name():
    assert GPTConfig.from_name("gpt2") == GPTConfig(12, 12, 768)
    assert GPTConfig.from_name("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPTConfig.from_name("gpt3")
    assert LoRAConfig().scale == 8.0  # 32 / 4


# --------------------------------------------------------------------------- mixed precision


def casts_of_parameters(model: GPT, run) -> set[str]:
    """Names of the model's parameters that aten._to_copy (a dtype cast) reads while run() runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {id(p): n for n, p in model.named_parameters()}
    cast: set[str] = set()

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket == torch.ops.aten._to_copy and id(args[0]) in names:
                cast.add(names[id(args[0])])
            return func(*args, **(kwargs or {}))

    with Casts():
        run()
    return cast


def bf16_train_step(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and LoRA gradients of one bf16-autocast forward and backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    logits.float().logsumexp(-1).mean().backward()
    return logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_base_in_bf16_trains_exactly_like_autocast_without_casting_it():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=23, block_size=16)
    lora = LoRAConfig(r=2, dropout=0.0, targets=("q", "v", "o"))
    _, fp32 = base_and_lora(config, lora)
    randomize_lora(fp32, 0)
    with torch.no_grad():  # the token embedding is looked up in bf16 afterwards: make it bf16-exact
        fp32.wte.weight.copy_(fp32.wte.weight.to(torch.bfloat16))
    bf16 = GPT(config, lora).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.cast_frozen_base(torch.bfloat16)
    idx = random_tokens(config, 0, 2, 16)

    assert {p.dtype for n, p in bf16.named_parameters() if ".c_" in n or n == "wte.weight"} == {torch.bfloat16}
    assert {p.dtype for n, p in bf16.named_parameters() if p.requires_grad or "ln_" in n or n == "wpe.weight"} == {
        torch.float32}
    assert bf16.lm_head.weight is bf16.wte.weight  # still tied
    # Autocast re-casts every frozen fp32 weight at every forward, and none of the bf16 ones.
    frozen_cast = casts_of_parameters(fp32, lambda: bf16_train_step(fp32, idx))
    assert {n for n, p in fp32.named_parameters() if not p.requires_grad and ".c_" in n} <= frozen_cast
    assert all(".lora." in n for n in casts_of_parameters(bf16, lambda: bf16_train_step(bf16, idx)))
    # ... and the numbers are the same: same logits, same LoRA gradients (float32).
    logits, grads = bf16_train_step(fp32, idx)
    logits_bf16, grads_bf16 = bf16_train_step(bf16, idx)
    assert torch.equal(logits_bf16, logits)
    assert grads_bf16.keys() == grads.keys() and all(torch.equal(grads_bf16[n], grads[n]) for n in grads)
    assert {g.dtype for g in grads_bf16.values()} == {torch.float32}


def test_full_fine_tuning_keeps_every_weight_float32():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11, block_size=8))  # no LoRA: all train
    model.cast_frozen_base(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_kv_cache_is_allocated_in_the_autocast_dtype(monkeypatch):
    import lora_min.decode

    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11, block_size=16)
    model = GPT(config, LoRAConfig(r=2)).eval()
    caches = []

    class RecordedKVCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(lora_min.decode, "KVCache", RecordedKVCache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora_min.decode.greedy(model, [[1, 2, 3]], max_new_tokens=3, eos_ids=())
        lora_min.decode.beam_search(model, [[1, 2, 3]], beam_size=2, max_new_tokens=3, eos_ids=())
    lora_min.decode.greedy(model, [[1, 2, 3]], max_new_tokens=3, eos_ids=())
    assert [c.k.dtype for c in caches] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert [c.v.dtype for c in caches] == [torch.bfloat16, torch.bfloat16, torch.float32]
