"""Mixed-adapter batches (``adapter_names=[...]``) on tiny Llama and on bare layers, against peft 0.21.2.

Each sample's output must equal a run of the whole batch with that sample's adapter active (the base
model for ``"__base__"``) and peft's mixed-batch output; errors follow peft's.
"""

from __future__ import annotations

import concurrent.futures
import copy

import pytest
import torch

import peft
import transformers

import peftcore
import peftcore_torch
from peftcore.errors import ConfigError, MergeError, ShapeMismatchError
from peftcore_torch import layers as torch_layers

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(24).reshape(4, 6) * 5 % 64
NAMES = ["x", "__base__", "y", "x"]
ADAPTERS = {
    "x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "y": dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "embed_tokens"], use_rslora=True),
}


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair(base) -> tuple[peftcore_torch.PeftModel, peft.PeftModel]:
    return _build_pair(base)


def _build_pair(base) -> tuple[peftcore_torch.PeftModel, peft.PeftModel]:
    """Ours and peft's, holding the same adapters x and y (x active).

    Tests that make a mixed forward raise build their own pair: peft leaves its adapter_names hooks
    registered when the forward raises, and they would leak into every later call.
    """
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **ADAPTERS["x"]),
                                 adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(init_lora_weights=False, **ADAPTERS["y"]))
    ours = peftcore_torch.get_peft_model(copy.deepcopy(base),
                                         peftcore.LoraConfig(init_lora_weights=False, **ADAPTERS["x"]),
                                         adapter_name="x")
    ours.add_adapter("y", peftcore.LoraConfig(init_lora_weights=False, **ADAPTERS["y"]))
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _assert_close(actual: torch.Tensor, desired: torch.Tensor, rtol: float = RTOL) -> None:
    actual, desired = actual.detach().double(), desired.detach().double()
    torch.testing.assert_close(actual, desired, rtol=rtol, atol=rtol * max(float(desired.abs().max()), 1e-6))


def _per_sample(model, names, run) -> torch.Tensor:
    """``run()`` with each sample's adapter active (adapters disabled for "__base__"), row by row."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run()[i])
        else:
            model.set_adapter(name)
            rows.append(run()[i])
    model.set_adapter("x")
    return torch.stack(rows)


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def test_mixed_batch_equals_per_sample_runs_and_peft(pair):
    ours, theirs = pair
    mixed = _logits(ours, adapter_names=NAMES)
    _assert_close(mixed, _per_sample(ours, NAMES, lambda: _logits(ours)))
    _assert_close(mixed, _logits(theirs, adapter_names=NAMES))
    # the adapters really differ per row, and nothing stays assigned after the call
    assert not torch.allclose(mixed[0], _logits(ours, adapter_names=["y"] * 4)[0])
    _assert_close(_logits(ours), _logits(theirs))
    assert torch_layers._open_contexts == 0 and torch_layers._ASSIGNED_ADAPTER_NAMES.get() == {}


def test_mixed_batch_ignores_active_adapter_and_handles_all_base(pair):
    ours, theirs = pair
    ours.set_adapter("y")
    theirs.set_adapter("y")
    try:
        names = ["x", "x", "__base__", "x"]
        _assert_close(_logits(ours, adapter_names=names), _logits(theirs, adapter_names=names))
        with ours.disable_adapter():
            base_logits = _logits(ours)
        _assert_close(_logits(ours, adapter_names=["__base__"] * 4), base_logits)
    finally:
        ours.set_adapter("x")
        theirs.set_adapter("x")


def test_disabled_adapters_ignore_adapter_names_like_peft(pair):
    ours, theirs = pair
    with ours.disable_adapter(), theirs.disable_adapter():
        _assert_close(_logits(ours, adapter_names=NAMES), _logits(theirs, adapter_names=NAMES))
        _assert_close(_logits(ours, adapter_names=NAMES), _logits(ours))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_adapter_names_equals_peft_and_per_sample(pair, num_beams):
    ours, theirs = pair
    prompt = IDS[:, :4]
    options = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        generated = ours.generate(input_ids=prompt, adapter_names=NAMES, **options)
        expected = theirs.generate(input_ids=prompt, adapter_names=NAMES, **options)
        per_sample = _per_sample(ours, NAMES, lambda: ours.generate(input_ids=prompt, **options))
    assert torch.equal(generated, expected)
    assert torch.equal(generated, per_sample)
    assert generated.shape == (4, 8)


def test_errors_follow_peft(base):
    ours, theirs = _build_pair(base)
    for model in (ours, theirs):
        with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
            _logits(model, adapter_names=["x", "y"])
        with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope"):
            _logits(model, adapter_names=["x", "nope", "x", "x"])
        model.train()
        try:
            with pytest.raises(ValueError, match="training mode"):
                _logits(model, adapter_names=NAMES)
        finally:
            model.eval()
    with pytest.raises(ShapeMismatchError):
        _logits(ours, adapter_names=["x", "y"])
    with pytest.raises(ConfigError, match="nope"):
        _logits(ours, adapter_names=["nope"] * 4)
    # an error inside the forward leaves nothing behind (unlike peft's hooks)
    assert torch_layers._open_contexts == 0 and torch_layers._ASSIGNED_ADAPTER_NAMES.get() == {}
    clean_ours, clean_theirs = _build_pair(base)
    _assert_close(_logits(ours), _logits(clean_theirs))
    _assert_close(_logits(ours, adapter_names=NAMES), _logits(clean_ours, adapter_names=NAMES))


def test_merged_adapters_are_refused(base):
    ours, theirs = _build_pair(base)
    for model in (ours, theirs):
        model.merge_adapter()
        with pytest.raises(ValueError, match="merged adapters"):
            _logits(model, adapter_names=NAMES)
    with pytest.raises(MergeError, match="unmerge_adapter"):
        _logits(ours, adapter_names=NAMES)
    ours.unmerge_adapter()
    _assert_close(_logits(ours, adapter_names=NAMES), _logits(_build_pair(base)[0], adapter_names=NAMES))


def test_dora_adapters_are_refused_like_peft(base):
    kwargs = dict(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    ours = peftcore_torch.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(**kwargs), adapter_name="x").eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs), adapter_name="x").eval()
    for model in (ours, theirs):
        with pytest.raises(ValueError, match="DoRA"):
            _logits(model, adapter_names=["x", "__base__", "x", "x"])
    with pytest.raises(ConfigError):
        _logits(ours, adapter_names=["x"] * 4)
    # a DoRA adapter that no sample names does not matter
    _logits(ours, adapter_names=["__base__"] * 4)


def test_concurrent_mixed_batches_do_not_interfere(pair):
    ours, _ = pair
    batches = [NAMES, ["y", "y", "x", "__base__"], ["__base__", "x", "x", "y"]]
    expected = [_logits(ours, adapter_names=names) for names in batches]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(_logits, ours, adapter_names=names) for names in batches * 3]
        results = [future.result() for future in futures]
    for i, result in enumerate(results):
        assert torch.equal(result, expected[i % len(batches)])


def test_modules_to_save_rows_use_their_adapter_copy(base):
    torch.manual_seed(5)
    ours = peftcore_torch.get_peft_model(
        copy.deepcopy(base), peftcore.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
        adapter_name="x")
    ours.add_adapter("y", peftcore.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"],
                                              init_lora_weights=False))
    with torch.no_grad():
        ours.get_base_model().lm_head.modules_to_save["y"].weight.mul_(1.5)
    ours.eval()
    names = ["y", "x", "__base__", "y"]
    _assert_close(_logits(ours, adapter_names=names), _per_sample(ours, names, lambda: _logits(ours)))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6, padding_idx=0)
        self.lin = torch.nn.Linear(6, 6)
        self.conv = torch.nn.Conv1d(6, 4, 3, padding=1)

    def forward(self, ids):
        return self.conv(self.lin(self.emb(ids)).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_linear_and_conv_layers_equal_peft(dtype):
    torch.manual_seed(6)
    net = _Net().to(dtype)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7], [9, 8, 0, 1]])
    targets = ["emb", "lin", "conv"]
    ours = peftcore_torch.get_peft_model(copy.deepcopy(net), peftcore.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapter_name="x")
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapter_name="x")
    for model, config in ((ours, peftcore.LoraConfig), (theirs, peft.LoraConfig)):
        model.add_adapter("y", config(r=3, lora_alpha=3, target_modules=["emb", "conv"], init_lora_weights=False))
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    names = ["y", "__base__", "x"]
    with torch.no_grad():
        mixed = ours(ids, adapter_names=names)
        expected = theirs(ids, adapter_names=names)
        per_sample = _per_sample(ours, names, lambda: ours(ids))
    assert mixed.dtype == dtype
    rtol = RTOL if dtype == torch.float32 else 1e-2
    _assert_close(mixed, expected, rtol=rtol)
    _assert_close(mixed, per_sample, rtol=rtol)
    # a layer called directly takes adapter_names as its own keyword, as peft's layers do
    layer = ours.get_base_model().lin
    hidden = torch.randn(3, 2, 6, dtype=dtype)
    with torch.no_grad():
        direct = layer(hidden, adapter_names=["x", "__base__", "x"])
        ours.set_adapter("x")
        _assert_close(direct[0], layer(hidden)[0], rtol=rtol)
        _assert_close(direct[1], layer.base_layer(hidden)[1], rtol=rtol)
