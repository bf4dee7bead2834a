"""Adapter files, hot swap, mixed-adapter batches and Hugging Face interop (lora_min/adapters.py).

The interop tests run the real libraries: PEFT's PeftModel on transformers' GPT2LMHeadModel must
give the logits lora-min gives, with tiny random models so the file stays fast.
"""

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_min import adapters
from lora_min.adapters import (
    add_adapter,
    disable_adapters,
    greedy_mixed,
    load_adapter,
    lora_config_from_metadata,
    mixed_adapters,
    model_from_adapter,
    read_adapter_metadata,
    remove_adapter,
    save_adapter,
    set_adapter,
)
from lora_min.decode import greedy
from lora_min.hf_interop import export_merged, export_peft, import_peft
from lora_min.model import GPT, GPTConfig, KVCache, LoRAConfig, lora_state_dict
from lora_min.weights import read_safetensors, write_safetensors

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=32)
TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41], [4, 4, 8, 15, 16, 23, 42, 0]])


def randomize_lora(model: GPT, seed: int, spread: float = 0.3) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, update in model.lora_updates():
            update.A.copy_(torch.randn(update.A.shape, generator=g) * spread)
            update.B.copy_(torch.randn(update.B.shape, generator=g) * spread)
    return model


def base_model(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(1234)
    return GPT(config).eval()


def lora_model(lora: LoRAConfig, seed: int = 0, config: GPTConfig = CONFIG) -> GPT:
    """The random base of base_model() with a random LoRA (different per seed)."""
    model = GPT(config, lora)
    model.load_state_dict(base_model(config).state_dict(), strict=False)
    return randomize_lora(model, seed).eval()


def logits(model: GPT, idx: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


# -----------------------------------------------------------------------------
# Adapter files


def test_save_and_load_round_trip(tmp_path):
    lora = LoRAConfig(r=3, alpha=12, dropout=0.05, targets=("q", "v", "o"))
    trained = lora_model(lora, seed=1)
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path, base_model="some/base", extra_metadata={"step": "100"})
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary file left behind

    fresh = lora_model(lora, seed=2)
    meta = load_adapter(fresh, path)
    for key, value in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh)[key], value)
    assert torch.equal(logits(fresh), logits(trained))
    assert meta["base_model"] == "some/base" and meta["step"] == "100" and meta["dtype"] == "float32"
    assert lora_config_from_metadata(read_adapter_metadata(path)) == lora
    # Only the LoRA tensors are in the file: r * (in + out) per target and layer.
    tensors, _ = read_safetensors(path)
    assert sum(t.numel() for t in tensors.values()) == CONFIG.n_layer * 3 * 3 * (16 + 16)


@pytest.mark.parametrize("other, named", [
    (dict(config=GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=50, block_size=32)), "n_layer 2 .* vs 3"),
    (dict(config=GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=51, block_size=32)), "vocab_size 50"),
    (dict(lora=LoRAConfig(r=3, targets=("q", "k"))), r"targets=\('q', 'v'\).*targets=\('q', 'k'\)"),
    (dict(lora=LoRAConfig(r=4, targets=("q", "v"))), "r=3 .* r=4"),
    (dict(lora=LoRAConfig(r=3, alpha=16, targets=("q", "v"))), "alpha=32.0 .* alpha=16"),
])
def test_loading_into_an_incompatible_model_names_the_mismatch(tmp_path, other, named):
    save_adapter(lora_model(LoRAConfig(r=3, targets=("q", "v"))), tmp_path / "a.safetensors")
    model = GPT(other.get("config", CONFIG), other.get("lora", LoRAConfig(r=3, targets=("q", "v"))))
    with pytest.raises(ValueError, match=named):
        load_adapter(model, tmp_path / "a.safetensors")


def test_loading_into_a_model_without_lora_or_merged_is_refused(tmp_path):
    model = lora_model(LoRAConfig())
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="has no LoRA"):
        load_adapter(GPT(CONFIG), tmp_path / "a.safetensors")
    model.merge_lora()
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter(model, tmp_path / "a.safetensors")


def test_truncated_tampered_or_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(lora_model(LoRAConfig()), path)
    data = path.read_bytes()
    model = lora_model(LoRAConfig())

    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_adapter(model, tmp_path / "cut.safetensors")

    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # one bit of one tensor value
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        load_adapter(model, tmp_path / "flip.safetensors")

    tensors, meta = read_safetensors(path)
    write_safetensors(tmp_path / "alpha.safetensors", tensors, {**meta, "lora_alpha": "64.0"})
    with pytest.raises(ValueError, match="checksum"):
        load_adapter(model, tmp_path / "alpha.safetensors")

    write_safetensors(tmp_path / "plain.safetensors", tensors)
    with pytest.raises(ValueError, match="not a lora-min adapter"):
        load_adapter(model, tmp_path / "plain.safetensors")


@pytest.mark.parametrize("edit, problem", [
    ({"lora_r": "four"}, "bad LoRA settings in the adapter metadata: invalid literal for int"),
    ({"lora_r": "9" * 10_000}, "bad LoRA settings in the adapter metadata: Exceeds the limit"),
    ({"lora_alpha": "nan"}, "LoRAConfig.alpha must be positive"),
    ({"lora_targets": "q,x"}, "LoRAConfig.targets must be distinct"),
    ({"base_config": "{"}, "'base_config' is not JSON"),
    ({"base_config": "[1]"}, "'base_config' is not a JSON object"),
    ({"base_model": None}, "adapter metadata lacks base_model"),
])
def test_bad_metadata_under_a_valid_checksum_is_named(tmp_path, edit, problem):
    """Whoever edits the metadata and recomputes the checksum gets a one-line error naming the file."""
    tensors = lora_state_dict(lora_model(LoRAConfig()))
    path = tmp_path / "edited.safetensors"
    adapters.write_adapter(path, tensors, LoRAConfig(), CONFIG, "gpt2")
    metadata = {k: v for k, v in {**read_safetensors(path)[1], **edit}.items() if v is not None}
    metadata["checksum_sha256"] = adapters.adapter_checksum(tensors, metadata)
    write_safetensors(path, tensors, metadata)
    for load in (read_adapter_metadata, lambda p: load_adapter(lora_model(LoRAConfig()), p)):
        with pytest.raises(ValueError, match=problem) as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_an_adapter_with_nan_values_loads_with_a_warning(tmp_path):
    model = lora_model(LoRAConfig())
    with torch.no_grad():
        model.h[1].attn.lora["v"].B[0, 0] = float("nan")
    save_adapter(model, tmp_path / "nan.safetensors")
    with pytest.warns(UserWarning, match=r"nan.safetensors: 1 tensor\(s\) hold NaN or inf values, first 'h.1.attn.lora.v.B'"):
        load_adapter(lora_model(LoRAConfig()), tmp_path / "nan.safetensors")


def test_extra_metadata_cannot_override_the_format(tmp_path):
    with pytest.raises(ValueError, match="'lora_r' is reserved"):
        save_adapter(lora_model(LoRAConfig()), tmp_path / "a.safetensors", extra_metadata={"lora_r": "8"})


def test_model_from_adapter_builds_the_named_base(tmp_path):
    base = GPT(CONFIG)
    export_merged(base, tmp_path / "base")  # a Hugging Face checkpoint folder of the base
    model = GPT.from_pretrained(tmp_path / "base", lora=LoRAConfig(r=2, alpha=4, targets=("k",)))
    randomize_lora(model, 3)
    save_adapter(model, tmp_path / "a.safetensors", base_model=str(tmp_path / "base"))
    rebuilt = model_from_adapter(tmp_path / "a.safetensors").eval()
    assert rebuilt.lora_config == model.lora_config
    assert torch.equal(logits(rebuilt), logits(model.eval()))


# -----------------------------------------------------------------------------
# Hot swap

ADAPTER_CONFIGS = {
    "qv": LoRAConfig(r=4, alpha=32, targets=("q", "v")),
    "ko": LoRAConfig(r=2, alpha=3, targets=("k", "o")),
    "all": LoRAConfig(r=1, alpha=1, targets=("q", "k", "v", "o")),
}


@pytest.fixture
def swap_setup(tmp_path):
    """A base model and three adapter files of different ranks and targets; also each adapter
    loaded the ordinary way, as the reference."""
    references = {}
    for seed, (name, lora) in enumerate(ADAPTER_CONFIGS.items()):
        references[name] = lora_model(lora, seed)
        save_adapter(references[name], tmp_path / f"{name}.safetensors")
    server = base_model()  # a base model without LoRA hosts them all
    for name in ADAPTER_CONFIGS:
        add_adapter(server, name, tmp_path / f"{name}.safetensors")
    return server, references


def test_set_adapter_gives_each_adapters_logits_without_touching_the_base(swap_setup):
    server, references = swap_setup
    base_weights = {k: (v.data_ptr(), v.clone()) for k, v in server.state_dict().items()}
    base_logits = logits(server)
    for name in ["qv", "ko", "all", "qv"]:
        set_adapter(server, name)
        assert server.lora_config == ADAPTER_CONFIGS[name] and server.active_adapter == name
        assert torch.equal(logits(server), logits(references[name]))
        # The active adapter's tensors are the resident ones (rebound, not copied).
        resident = server.resident_adapters[name].layers[0]
        assert all(server.h[0].attn.lora[t] is resident[t] for t in ADAPTER_CONFIGS[name].targets)
    with disable_adapters(server):
        assert torch.equal(logits(server), base_logits)
    assert torch.equal(logits(server), logits(references["qv"]))  # re-enabled after the block
    for key, (ptr, value) in base_weights.items():
        assert server.state_dict()[key].data_ptr() == ptr and torch.equal(server.state_dict()[key], value)


def test_merge_one_adapter_for_serving_then_swap(swap_setup):
    server, references = swap_setup
    set_adapter(server, "ko")
    before = {k: v.clone() for k, v in server.state_dict().items()}
    server.merge_lora()
    torch.testing.assert_close(logits(server), logits(references["ko"]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unmerge_lora"):
        set_adapter(server, "qv")
    server.unmerge_lora()
    for key, value in server.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    set_adapter(server, "qv")  # W0 came back up to rounding, so the logits do too
    torch.testing.assert_close(logits(server), logits(references["qv"]), atol=1e-5, rtol=1e-5)


def test_add_adapter_checks_and_names(swap_setup, tmp_path):
    server, _ = swap_setup
    with pytest.raises(ValueError, match="already resident"):
        add_adapter(server, "qv", tmp_path / "qv.safetensors")
    with pytest.raises(KeyError, match="no resident adapter 'nope'"):
        set_adapter(server, "nope")
    other = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=50, block_size=32))
    with pytest.raises(ValueError, match="n_embd 16 .* vs 8"):
        add_adapter(other, "qv", tmp_path / "qv.safetensors")
    set_adapter(server, "qv")
    with pytest.raises(ValueError, match="is active"):
        remove_adapter(server, "qv")
    remove_adapter(server, "ko")
    assert sorted(server.resident_adapters) == ["all", "qv"]
    # From tensors in memory, e.g. the model just trained.
    trained = lora_model(LoRAConfig(r=2, targets=("v",)), seed=9)
    add_adapter(server, "mine", lora_state_dict(trained), config=trained.lora_config)
    set_adapter(server, "mine")
    assert torch.equal(logits(server), logits(trained))


# -----------------------------------------------------------------------------
# Mixed-adapter batches


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return idx, mask


def alone(server: GPT, name: str | None, idx: torch.Tensor) -> torch.Tensor:
    """One row's logits, run by itself with its adapter (or none)."""
    if name is None:
        with disable_adapters(server):
            return logits(server, idx)
    set_adapter(server, name)
    return logits(server, idx)


@given(
    st.lists(st.sampled_from([None, "qv", "ko", "all"]), min_size=1, max_size=5),
    st.lists(st.integers(1, 7), min_size=5, max_size=5),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_mixed_batch_equals_each_row_alone(swap_setup, names, lengths, n_new, seed):
    """Each row with its own adapter in one forward pass, then decoding on a KV cache, gives what
    the row gives run alone with its adapter."""
    server, _ = swap_setup
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 50, (lengths[i] + n_new,), generator=g).tolist() for i in range(len(names))]
    prompts = [r[:-n_new] for r in rows]
    idx, mask = left_pad(prompts)
    with torch.no_grad(), mixed_adapters(server, names):
        full = server(idx, attention_mask=mask)
        cache = KVCache(CONFIG, len(rows), idx.size(1) + n_new)
        server(idx, attention_mask=mask, cache=cache)
        steps = [server(torch.tensor([[r[len(p) + j - 1]] for r, p in zip(rows, prompts)]), cache=cache)
                 for j in range(1, n_new + 1)]
    for i, (name, row, prompt) in enumerate(zip(names, rows, prompts)):
        expected = alone(server, name, torch.tensor([row]))[0]
        pad = idx.size(1) - len(prompt)
        torch.testing.assert_close(full[i, pad:], expected[: len(prompt)], atol=1e-5, rtol=1e-5)
        # Decoding step j fed token len(prompt) + j - 1 and predicts the one after it.
        for j, step in enumerate(steps, start=1):
            torch.testing.assert_close(step[i, 0], expected[len(prompt) + j - 1], atol=1e-5, rtol=1e-5)


def test_greedy_mixed_equals_greedy_with_each_adapter(swap_setup):
    server, _ = swap_setup
    server.double()  # float64: no near-ties between the top two tokens
    with torch.no_grad():
        for p in server.parameters():
            p.mul_(8.0)  # peaked distributions, so EOS shows up and rows finish at different steps
    names = ["qv", None, "ko", "all", "qv", None]
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15], [16, 17]]
    eos_ids = tuple(range(0, 50, 3))
    mixed = greedy_mixed(server, prompts, names, max_new_tokens=8, eos_ids=eos_ids)
    expected = []
    for name, prompt in zip(names, prompts):
        if name is None:
            with disable_adapters(server):
                expected += greedy(server, [prompt], 8, eos_ids=eos_ids)
        else:
            set_adapter(server, name)
            expected += greedy(server, [prompt], 8, eos_ids=eos_ids)
    assert mixed == expected
    assert len({len(t) for t in expected}) > 1  # rows really finished at different steps


def test_mixed_batch_refuses_a_batch_of_another_size(swap_setup):
    server, _ = swap_setup
    with mixed_adapters(server, ["qv", "ko"]), pytest.raises(ValueError, match="2 adapter names but the batch has 3"):
        server(torch.zeros(3, 4, dtype=torch.long))
    # Also when no row names an adapter (no per-row update would notice), and for no names at all.
    with mixed_adapters(server, [None]), pytest.raises(ValueError, match="1 adapter names but the batch has 2"):
        server(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="one adapter name \\(or None\\) per batch row; got no names"):
        with mixed_adapters(server, []):
            server(torch.zeros(2, 4, dtype=torch.long))
    server(torch.zeros(3, 4, dtype=torch.long))  # the check leaves with the block


# -----------------------------------------------------------------------------
# Hugging Face interop


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """transformers' GPT-2 (tiny, random weights) saved with save_pretrained, and its folder."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "base"
    model.save_pretrained(str(folder))
    return folder


def hf_model(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o"), ("k",), ("o",), ("v", "o")])
def test_export_peft_gives_the_same_logits_in_peft(hf_base, tmp_path, targets):
    model = GPT.from_pretrained(hf_base, lora=LoRAConfig(r=3, alpha=7, targets=targets))
    randomize_lora(model, 5).eval()
    export_peft(tmp_path / "peft", lora_state_dict(model), model.lora_config)
    peft_model = peft.PeftModel.from_pretrained(hf_model(hf_base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
    ours = logits(model)
    assert max_diff(ours, logits(GPT.from_pretrained(hf_base))) > 1e-3  # the adapter matters
    assert max_diff(theirs, ours) < 1e-5
    # mlp.c_proj must not have been adapted (PEFT matches target names by suffix).
    assert not any("mlp" in name for name, _ in peft_model.named_modules() if name.endswith("lora_A"))


def peft_trained_elsewhere(hf_base, folder, seed=0, **lora_kwargs):
    """A PEFT LoRA on our tiny GPT-2, its B made non-zero as training would, saved in PEFT's format."""
    config = peft.LoraConfig(fan_in_fan_out=True, **lora_kwargs)  # GPT-2's Conv1D layers are (in, out)
    peft_model = peft.get_peft_model(hf_model(hf_base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


@pytest.mark.parametrize("lora_kwargs", [
    dict(r=2, lora_alpha=8, target_modules=["c_attn"]),
    dict(r=2, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"], rank_pattern={"c_proj": 3},
         alpha_pattern={"c_proj": 5}),
    dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["attn.c_proj"], layers_to_transform=[1]),
])
def test_import_peft_gives_the_same_logits(hf_base, tmp_path, lora_kwargs):
    peft_model = peft_trained_elsewhere(hf_base, tmp_path / "peft", **lora_kwargs)
    base = GPT.from_pretrained(hf_base).eval()
    tensors, lora = import_peft(tmp_path / "peft", base.config)
    add_adapter(base, "imported", tensors, config=lora)
    set_adapter(base, "imported")
    with torch.no_grad():
        assert max_diff(logits(base), peft_model(TOKENS).logits) < 1e-5


def test_peft_round_trip_recovers_the_adapter_exactly(hf_base, tmp_path):
    model = GPT.from_pretrained(hf_base, lora=LoRAConfig(r=3, alpha=7, targets=("q", "v", "o")))
    randomize_lora(model, 6)
    export_peft(tmp_path / "peft", lora_state_dict(model), model.lora_config)
    tensors, lora = import_peft(tmp_path / "peft", model.config)
    # k was never adapted, and the zero blocks of the rank-2r c_attn update are dropped again.
    assert lora == LoRAConfig(r=3, alpha=7, dropout=model.lora_config.dropout, targets=("q", "v", "o"))
    for key, value in lora_state_dict(model).items():
        assert torch.equal(tensors[key], value)


def test_import_peft_names_what_lora_min_cannot_express(hf_base, tmp_path):
    peft_trained_elsewhere(hf_base, tmp_path / "mlp", target_modules=["c_attn", "c_fc"])
    with pytest.raises(ValueError, match="cannot express LoRA on mlp.c_fc"):
        import_peft(tmp_path / "mlp", CONFIG)
    peft_trained_elsewhere(hf_base, tmp_path / "dora", target_modules=["c_attn"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        import_peft(tmp_path / "dora", CONFIG)
    peft_trained_elsewhere(hf_base, tmp_path / "bias", target_modules=["c_attn"], bias="lora_only")
    with pytest.raises(ValueError, match="bias"):
        import_peft(tmp_path / "bias", CONFIG)


def test_import_peft_refuses_an_adapter_made_for_fewer_layers(hf_base, tmp_path):
    peft_trained_elsewhere(hf_base, tmp_path / "peft", r=2, target_modules=["c_attn"])  # for the 2-layer base
    deeper = GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=50, block_size=32)
    with pytest.raises(ValueError, match=r"attn.c_attn has LoRA tensors for layers \[0, 1\], but "
                                         r"adapter_config.json says layers \[0, 1, 2\] of this 3-layer base"):
        import_peft(tmp_path / "peft", deeper)


@pytest.mark.parametrize("config_text, problem", [
    ('{"peft_type": "LORA", "r": 2,', "adapter_config.json: not valid JSON"),
    ('["LORA"]', "adapter_config.json: not a JSON object"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": "eight"}', "lora_alpha for transformer.h.0.attn.c_attn is 'eight'"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 8, "lora_dropout": "none"}', "lora_dropout is 'none'"),
])
def test_a_corrupt_adapter_config_json_is_named(hf_base, tmp_path, config_text, problem, capsys):
    peft_trained_elsewhere(hf_base, tmp_path / "peft", r=2, target_modules=["c_attn"])
    (tmp_path / "peft" / "adapter_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=problem) as info:
        import_peft(tmp_path / "peft", CONFIG)
    assert str(tmp_path / "peft") in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()  # drop what making the PEFT adapter printed
    with pytest.raises(SystemExit) as exit_info:  # the command prints the same one line
        adapters.main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "a.safetensors"), "--base", str(hf_base)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"python -m lora_min.adapters import-peft: error: {info.value}\n"


def test_export_merged_loads_in_transformers_with_the_same_logits(hf_base, tmp_path):
    model = GPT.from_pretrained(hf_base, lora=LoRAConfig(r=2, alpha=5, targets=("q", "k", "v", "o")))
    randomize_lora(model, 7).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, tmp_path / "merged")
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors"]
    for key, value in model.state_dict().items():  # the model itself is not merged
        assert torch.equal(value, before[key])
    keys = read_safetensors(tmp_path / "merged" / "model.safetensors")[0]
    assert "h.0.attn.c_attn.weight" in keys and keys["h.0.attn.c_attn.weight"].shape == (16, 48)  # (in, out)
    hf = hf_model(tmp_path / "merged")
    with torch.no_grad():
        assert max_diff(hf(TOKENS).logits, logits(model)) < 1e-5
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["n_layer"] == 2


def test_cli(hf_base, tmp_path, capsys):
    model = GPT.from_pretrained(hf_base, lora=LoRAConfig(r=2, targets=("q", "v")))
    randomize_lora(model, 8).eval()
    save_adapter(model, tmp_path / "a.safetensors", base_model=str(hf_base))

    adapters.main(["info", str(tmp_path / "a.safetensors")])
    out = capsys.readouterr().out
    assert "checksum OK" in out and "lora_targets: q,v" in out

    adapters.main(["export-peft", str(tmp_path / "a.safetensors"), str(tmp_path / "peft")])
    adapters.main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "b.safetensors"), "--base", str(hf_base)])
    reloaded = model_from_adapter(tmp_path / "b.safetensors").eval()
    assert torch.equal(logits(reloaded), logits(model))

    adapters.main(["export-merged", str(tmp_path / "a.safetensors"), str(tmp_path / "merged")])
    with torch.no_grad():
        assert max_diff(hf_model(tmp_path / "merged")(TOKENS).logits, logits(model)) < 1e-5


@pytest.mark.parametrize("command", ["info", "export-peft", "import-peft", "export-merged"])
def test_cli_help_explains_every_argument(command, capsys):
    with pytest.raises(SystemExit):
        adapters.main([command, "--help"])
    usage = capsys.readouterr().out
    positionals = usage.split("positional arguments:\n")[1].split("\n\n")[0].splitlines()
    names = [line.split()[0] for line in positionals if line.startswith("  ") and not line.startswith("   ")]
    assert names  # each has a help text: on its line, or on the next, indented further
    for i, line in enumerate(positionals):
        if line.split()[0] in names:
            assert len(line.split()) > 1 or positionals[i + 1].startswith("   "), line


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "not-an-adapter.safetensors").write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        adapters.main(["export-merged", str(tmp_path / "not-an-adapter.safetensors"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"python -m lora_min.adapters export-merged: error: {tmp_path / 'not-an-adapter.safetensors'}")
    assert not (tmp_path / "out").exists()
