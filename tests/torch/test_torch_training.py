"""Training a tiny Llama through peftcore_torch: optimizer steps, gradients, torch.compile, pickling, generate.

Gradients and AdamW trajectories are checked against real peft 0.21.2 from the same starting adapter.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import peft
import transformers

import peftcore
import peftcore_torch

pytestmark = pytest.mark.oracle

RTOL = 1e-5
BATCH = torch.arange(32).reshape(2, 16) * 7 % 64
STEPS = 4


@pytest.fixture(scope="module")
def base() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


CONFIGS = {
    "lora": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(target_modules=["q_proj", "k_proj", "gate_proj"], use_dora=True),
    "modules-to-save": dict(target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
}


def _config(cls, name: str, **extra):
    return cls(r=4, lora_alpha=8, lora_dropout=0.0, **CONFIGS[name], **extra)


def _pair(base, name: str, **extra) -> tuple[peftcore_torch.PeftModel, peft.PeftModel]:
    """Ours and peft's model on copies of ``base``, holding the same (peft-initialised) adapter."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft.LoraConfig, name, **extra))
    ours = peftcore_torch.get_peft_model(copy.deepcopy(base), _config(peftcore.LoraConfig, name, **extra))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _assert_close(actual: torch.Tensor, desired: torch.Tensor, rtol: float = RTOL) -> None:
    actual, desired = actual.detach(), desired.detach()
    torch.testing.assert_close(actual, desired, rtol=rtol, atol=rtol * max(float(desired.abs().max()), 1e-6))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _logits(model, ids: torch.Tensor = BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adamw_lowers_loss_and_changes_only_adapter_parameters(base, name):
    ours, theirs = _pair(base, name)
    trainable = _trainable(ours)
    assert trainable == _trainable(theirs)
    assert trainable and all(".lora_" in n or ".modules_to_save.default." in n for n in trainable)
    # default init: lora_B is zero, so the first step gives lora_A no gradient (in peft too)
    lora_A = {n for n in trainable if ".lora_A." in n}
    assert lora_A
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = ours(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        assert {n for n, p in ours.named_parameters() if p.grad is not None} == trainable
        zero_grad = {n for n, p in ours.named_parameters() if p.grad is not None and not p.grad.any()}
        assert zero_grad == (lora_A if step == 0 else set()), step
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = ours(input_ids=BATCH, labels=BATCH).loss.item()
    assert final < losses[0] and losses[-1] < losses[0], losses + [final]
    for n, p in ours.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_and_adamw_trajectory_equal_peft(base, name):
    ours, theirs = _pair(base, name, init_lora_weights=False)
    models = (ours.train(), theirs.train())
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=BATCH, labels=BATCH).loss.backward()
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
        our_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        assert sorted(our_grads) == sorted(their_grads)
        for n, grad in their_grads.items():
            assert grad.any(), n
            _assert_close(our_grads[n], grad)
        for optimizer in optimizers:
            optimizer.step()
    their_params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        _assert_close(p, their_params[n])


def test_torch_compile_inductor_matches_eager(base):
    # fullgraph: the adapter layers must not break dynamo's graph anywhere in the model
    ours, _ = _pair(base, "dora", init_lora_weights=False)
    ours.eval()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(ours, backend="inductor", fullgraph=True)
        _assert_close(_logits(compiled), _logits(ours))
    finally:
        torch._dynamo.reset()


def test_torch_compile_training_step_matches_eager(base):
    # aot_eager traces forward and backward like inductor does, without its C++ build time
    ours, _ = _pair(base, "lora", init_lora_weights=False)
    twin = copy.deepcopy(ours)
    ours.train()
    twin.train()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
        ours(input_ids=BATCH, labels=BATCH).loss.backward()
        compiled(input_ids=BATCH, labels=BATCH).loss.backward()
    finally:
        torch._dynamo.reset()
    twin_grads = dict(twin.named_parameters())
    for n, p in ours.named_parameters():
        assert (p.grad is None) == (twin_grads[n].grad is None), n
        if p.grad is not None:
            _assert_close(twin_grads[n].grad, p.grad)


def _round_trips(model):
    yield "pickle", pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)
    yield "deepcopy", copy.deepcopy(model)


def test_wrapped_model_pickles_and_deepcopies_with_identical_outputs(base):
    ours, _ = _pair(base, "dora", init_lora_weights=False)
    torch.manual_seed(3)
    ours.add_adapter("other", _config(peftcore.LoraConfig, "modules-to-save", init_lora_weights=False))
    ours.eval()
    expected = _logits(ours)
    ours.set_adapter("other")
    expected_other = _logits(ours)
    ours.set_adapter("default")
    for how, clone in _round_trips(ours):
        assert type(clone) is peftcore_torch.PeftModel, how
        assert torch.equal(_logits(clone), expected), how
        assert _trainable(clone) == _trainable(ours), how
        assert sorted(clone.state_dict()) == sorted(ours.state_dict()), how
        # the clone owns its tensors and still switches, merges and trains
        ours_ptrs = {p.data_ptr() for p in ours.parameters()}
        assert not any(p.data_ptr() in ours_ptrs for p in clone.parameters()), how
        clone.set_adapter("other")
        assert torch.equal(_logits(clone), expected_other), how
        clone.set_adapter("default")
        clone.merge_adapter()
        _assert_close(_logits(clone), expected)
        clone.unmerge_adapter()
        clone.train()
        clone(input_ids=BATCH, labels=BATCH).loss.backward()
        assert {n for n, p in clone.named_parameters() if p.grad is not None} == _trainable(clone), how
    assert torch.equal(_logits(ours), expected)
    assert all(p.grad is None for p in ours.parameters())


def test_generate_equals_peft_greedy(base):
    ours, theirs = _pair(base, "dora", init_lora_weights=False, task_type="CAUSAL_LM")
    prompt = BATCH[:, :5]
    options = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                   pad_token_id=0)
    with torch.no_grad():
        generated = ours.eval().generate(**options)
        expected = theirs.eval().generate(**options)
        plain = base.generate(**options)
    assert generated.shape == (2, 13)
    assert torch.equal(generated, expected)
    assert not torch.equal(generated, plain)  # the adapter really steers the generation
