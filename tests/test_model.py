"""ScalingLM: the parameter count the pipeline plans with, the recipe's pieces, save/load,
and the fused output loss training uses in place of ``forward``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from workflow.model import IGNORE_INDEX, OutputLoss, ScalingLM, build_model
from workflow.runs import count_parameters, ffn_hidden_size


def make_shape(d_model=32, n_layers=2, n_heads=2, vocab_size=256, context_length=16, multiple=16):
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "ffn_hidden": ffn_hidden_size(d_model, multiple),
        "vocab_size": vocab_size,
        "context_length": context_length,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
    }


@pytest.mark.parametrize(
    ("d_model", "n_layers", "n_heads", "vocab_size", "multiple"),
    [
        (16, 1, 2, 512, 8),
        (32, 2, 2, 1024, 16),
        (48, 3, 4, 2048, 16),
        (96, 8, 4, 50432, 256),  # the paper's 0.011B
    ],
)
def test_parameter_count_matches_runs(d_model, n_layers, n_heads, vocab_size, multiple):
    shape = make_shape(d_model, n_layers, n_heads, vocab_size, multiple=multiple)
    model = build_model(shape)
    expected = count_parameters(d_model, n_layers, vocab_size, shape["ffn_hidden"])
    assert sum(parameter.numel() for parameter in model.parameters()) == expected


def test_recipe_has_no_biases_and_untied_embeddings():
    model = build_model(make_shape())
    names = [name for name, _ in model.named_parameters()]
    assert not [name for name in names if name.endswith("bias")]
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    assert model.config.max_position_embeddings == 16


def test_attention_is_causal():
    torch.manual_seed(0)
    model = build_model(make_shape()).eval()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_forward_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    model = build_model(make_shape())
    ids = torch.randint(0, 256, (3, 16))
    output = model(ids, labels=ids)
    expected = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(output.loss, expected)


def test_init_is_gpt2_style():
    """std 0.02 everywhere, residual projections 0.02/sqrt(2 n_layers), gains 1."""
    torch.manual_seed(0)
    model = build_model(make_shape(d_model=64, n_layers=4, n_heads=2))
    assert model.blocks[0].attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for block in model.blocks:
        for projection in (block.attention.out, block.mlp.w3):
            assert projection.weight.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_shape()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ScalingLM)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_padding_mask_and_long_inputs_are_refused():
    model = build_model(make_shape())
    ids = torch.zeros((1, 8), dtype=torch.long)
    with pytest.raises(ValueError, match="no padding mask"):
        model(ids, attention_mask=torch.tensor([[0] + [1] * 7]))
    model(ids, attention_mask=torch.ones((1, 8)))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros((1, 17), dtype=torch.long))


def test_output_loss_matches_autograd_reference():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(256, 16, requires_grad=True)
    targets = torch.randint(0, 256, (2, 37))
    targets[1, 30:] = IGNORE_INDEX
    objective, cross_entropy = OutputLoss.apply(hidden, weight, targets, 1e-2, 10)
    objective.backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = (hidden @ weight.T).flatten(0, 1)
    flat_targets = targets.flatten()
    counted = flat_targets != IGNORE_INDEX
    reference_ce = torch.nn.functional.cross_entropy(logits, flat_targets, reduction="sum")
    reference = reference_ce + 1e-2 * torch.logsumexp(logits[counted], -1).square().sum()
    reference.backward()
    torch.testing.assert_close(cross_entropy, reference_ce.detach())
    torch.testing.assert_close(objective, reference.detach())
    torch.testing.assert_close(fused_grads[0], hidden.grad)
    torch.testing.assert_close(fused_grads[1], weight.grad)
