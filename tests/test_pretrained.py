"""Loading official GPT-2 checkpoints, checked against transformers' GPT2LMHeadModel.

Nothing can be downloaded here, so each test writes a checkpoint in the official format on the
spot: transformers' model with the real `gpt2` configuration and random weights, saved in the
hub's layout (keys without a prefix, Conv1D weights stored (in, out)) and in save_pretrained's.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lora_min.model import GPT, GPTConfig, KVCache, LoRAConfig  # noqa: E402


def hf_gpt2(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions
    )
    return transformers.GPT2LMHeadModel(config).eval()


def save_hub_layout(model, folder, with_config: bool):
    """The layout of openai-community/gpt2's model.safetensors: GPT2Model keys, no prefix,
    plus the causal-mask buffers older checkpoints carry."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    if with_config:
        model.config.to_json_file(str(folder / "config.json"))
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' GPT-2 (124M configuration, random weights) and its checkpoints on disk."""
    model = hf_gpt2()
    root = tmp_path_factory.mktemp("gpt2")
    hub_file = save_hub_layout(model, root / "hub", with_config=False)
    model.save_pretrained(str(root / "pretrained"))  # keys with the `transformer.` prefix
    torch.save(model.state_dict(), root / "pytorch_model.bin")
    return model, {"hub file": hub_file, "save_pretrained folder": root / "pretrained",
                   "pytorch_model.bin": root / "pytorch_model.bin"}


TOKENS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
                       [40, 1842, 284, 4483, 6729, 355, 257, 1310, 286, 50256]])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hub file", "save_pretrained folder", "pytorch_model.bin"])
def test_logits_match_transformers(reference, layout):
    hf, paths = reference
    model = GPT.from_pretrained(paths[layout]).eval()
    assert model.config == GPTConfig.from_name("gpt2")
    with torch.no_grad():
        expected = hf(TOKENS).logits
        got = model(TOKENS)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_lora_model_loads_the_same_base_and_matches(reference):
    hf, paths = reference
    model = GPT.from_pretrained(paths["hub file"], lora=LoRAConfig()).eval()
    with torch.no_grad():
        assert (model(TOKENS) - hf(TOKENS).logits).abs().max().item() < 1e-4
    assert all(p.requires_grad == (".lora." in n) for n, p in model.named_parameters())
    for _, _, update in model.lora_updates():  # LoRA initialised as in a fresh model
        assert torch.all(update.B == 0) and update.A.isfinite().all() and update.A.abs().sum() > 0


@pytest.mark.slow
def test_greedy_continuation_matches_generate(reference):
    hf, paths = reference
    model = GPT.from_pretrained(paths["hub file"]).eval()
    prompt = TOKENS[:1]
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=50256,
                               attention_mask=torch.ones_like(prompt))[0, prompt.size(1):].tolist()
        cache = KVCache(model.config, 1, prompt.size(1) + 20)
        logits = model(prompt, cache=cache)
        got = []
        for _ in range(20):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            got.append(nxt.item())
            logits = model(nxt, cache=cache)
    assert got == expected


def test_config_is_inferred_from_shapes_without_config_json(tmp_path):
    hf = hf_gpt2(n_layer=3, n_head=2, n_embd=128, vocab_size=100, n_positions=64)
    path = save_hub_layout(hf, tmp_path, with_config=False)
    # n_head = n_embd / 64, as in every official size; not an official width, so said aloud.
    with pytest.warns(UserWarning, match="no config.json; assuming 64-dimensional heads, so n_head = 2"):
        model = GPT.from_pretrained(path)
    assert model.config == GPTConfig(n_layer=3, n_head=2, n_embd=128, vocab_size=100, block_size=64)


def test_a_guessed_head_count_is_said_or_refused(tmp_path):
    hf = hf_gpt2(n_layer=1, n_head=4, n_embd=64, vocab_size=50, n_positions=16)
    path = save_hub_layout(hf, tmp_path / "64", with_config=False)
    with pytest.warns(UserWarning, match=r"n_head = 1 for n_embd=64\. If that is wrong, put the model's config.json"):
        GPT.from_pretrained(path)
    hf = hf_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    path = save_hub_layout(hf, tmp_path / "16", with_config=False)
    with pytest.raises(ValueError, match="n_embd=16 is not a multiple of the usual head size 64"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("config_text, problem", [
    ('{"n_layer": 2, "n_head": 2,', "not a valid GPT-2 config: Expecting"),
    ("[1, 2]", "not a valid GPT-2 config"),
    ('{"n_layer": 2, "n_head": "2", "n_embd": 16, "vocab_size": 50, "n_positions": 32}', "n_head must be a positive"),
])
def test_a_corrupt_config_json_is_named(tmp_path, config_text, problem):
    state = tiny_checkpoint(tmp_path)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(ValueError, match=problem) as info:
        GPT.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_config_json_beside_the_weights_wins(tmp_path):
    hf = hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64)
    save_hub_layout(hf, tmp_path, with_config=True)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.n_head == 4  # shapes alone would have said 32 / 64 = 0 heads
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5


def tiny_checkpoint(tmp_path):
    hf = hf_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    state = {k: v.clone() for k, v in hf.transformer.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    return state


def test_missing_key_is_named(tmp_path):
    state = tiny_checkpoint(tmp_path)
    del state["h.1.mlp.c_fc.bias"]
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys \['h\.1\.mlp\.c_fc\.bias'\]"):
        GPT.from_pretrained(tmp_path / "model.safetensors")


def test_unexpected_key_is_named(tmp_path):
    state = tiny_checkpoint(tmp_path)
    state["h.0.attn.extra.weight"] = torch.zeros(2)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"unexpected keys \['h\.0\.attn\.extra\.weight'\]"):
        GPT.from_pretrained(tmp_path)


def test_misshaped_key_names_the_key_and_both_shapes(tmp_path):
    state = tiny_checkpoint(tmp_path)
    state["h.0.attn.c_attn.weight"] = torch.zeros(48, 16)  # stored (out, in): not the official (in, out)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight' has shape \(16, 48\).*expects \(48, 16\)"):
        GPT.from_pretrained(tmp_path)


def test_an_unknown_name_that_is_no_path_is_refused():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT.from_pretrained("gpt-7")
