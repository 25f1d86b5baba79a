"""The paper's language model (a pre-norm decoder-only transformer) and its training loss.

Gadre et al. (2024) train open_lm models; this file is that recipe as one readable
``transformers`` model, so every checkpoint loads with ``AutoModelForCausalLM`` (and hence
in lm-eval's ``HFLM``) after ``import workflow.model``, and with ``trust_remote_code=True``
anywhere else (``save_pretrained`` copies this file next to the weights).

The recipe, top to bottom:

- token embedding -> ``n_layers`` blocks -> final LayerNorm -> output projection; the input
  and output embeddings are separate matrices (untied);
- each block is pre-norm: ``x + attention(norm(x))`` then ``x + swiglu(norm(x))``;
- every LayerNorm has a gain and no bias, and no linear layer has a bias;
- attention normalises queries and keys with a LayerNorm over the whole ``d_model`` (qk-norm,
  which keeps attention logits bounded at high learning rates), rotates them with RoPE, and
  calls ``scaled_dot_product_attention(is_causal=True)``;
- the MLP is SwiGLU with the hidden width given by the config (``workflow.runs.ffn_hidden_size``).

Two deliberate differences from open_lm. The qk-LayerNorms have no learnable gain
(non-parametric, as in OLMo): the paper's parameter counts leave the qk gains out, so with
this choice the model's parameter count, which ``workflow.runs.count_parameters`` computes
and the trainer asserts, is exactly the paper's N: both embeddings, the blocks and the norms.
And the weight init is GPT-2's rather than open_lm's (see ``ScalingLM``).

Training does not call ``forward``: it takes ``final_hidden_states`` and computes the output
layer, the cross-entropy and the z-loss in one fused, chunked pass (``OutputLoss``, after the
model), which never holds the whole logits array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

INIT_STD = 0.02
# Target of a position that counts for nothing (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
# Rows of logits the fused output loss materialises at once: about 4 MB of fp32 logits stays in
# a CPU's cache; on a GPU larger chunks only need to bound memory (V = 50k: 1,300 rows).
LOSS_CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}


class ScalingLMConfig(PreTrainedConfig):
    """Shape of a ScalingLM; the names are those of the config's shape (``RunSpec.shape``).

    ``attribute_map`` also exposes the usual Hugging Face names (``max_position_embeddings``,
    ``hidden_size``, ...) that tools such as lm-eval read.
    """

    model_type = "scaling_lm"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "ffn_hidden",
        "max_position_embeddings": "context_length",
    }

    def __init__(
        self,
        vocab_size: int = 1024,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        ffn_hidden: int = 176,
        context_length: int = 128,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.ffn_hidden = ffn_hidden
        self.context_length = context_length
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


def rotary_cos_sin(
    length: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions ``0..length-1``, shape (length, head_dim), in float32.

    Computed per forward pass instead of cached in a buffer: it is cheap next to a block and
    leaves nothing for ``from_pretrained`` to re-create.
    """
    inverse_frequency = theta ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(
        torch.arange(length, device=device, dtype=torch.float32), inverse_frequency
    )
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of ``x`` (batch, heads, length, head_dim) by position."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with non-parametric qk-LayerNorm and RoPE."""

    def __init__(self, config: ScalingLMConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.norm_eps = config.norm_eps
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        query, key, value = self.qkv(x).split(d_model, dim=-1)
        query = F.layer_norm(query, (d_model,), eps=self.norm_eps)
        key = F.layer_norm(key, (d_model,), eps=self.norm_eps)
        heads = (batch, length, self.n_heads, d_model // self.n_heads)
        query, key, value = (t.view(heads).transpose(1, 2) for t in (query, key, value))
        query = apply_rotary(query, cos, sin).to(value.dtype)
        key = apply_rotary(key, cos, sin).to(value.dtype)
        y = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, d_model))


class SwiGLU(nn.Module):
    """``w3(silu(x W_gate) * x W_up)``, with the gate and up projections in one matmul."""

    def __init__(self, config: ScalingLMConfig):
        super().__init__()
        self.w12 = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block; marks its residual projections for the depth-scaled init.

    With ``checkpointed`` set, training keeps only the block's input and recomputes its
    activations in the backward pass (about a third more compute for a block's worth of
    memory). The checkpoint sits inside ``forward``, so hooks on the module (FSDP's unshard
    and reshard) run once, outside it.
    """

    def __init__(self, config: ScalingLMConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)
        self.attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)
        self.mlp = SwiGLU(config)
        self.checkpointed = False
        for residual_projection in (self.attention.out, self.mlp.w3):
            residual_projection.depth_scale = 1 / math.sqrt(2 * config.n_layers)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self.residual_update, x, cos, sin, use_reentrant=False)
        return self.residual_update(x, cos, sin)

    def residual_update(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class ScalingLM(PreTrainedModel):
    """Decoder-only LM; ``forward`` returns logits, and the mean next-token loss given labels.

    Weight init is GPT-2's (as in nanoGPT): every matrix, embeddings and output layer
    included, is normal with std 0.02, and the two projections that write into the residual
    stream (attention ``out``, MLP ``w3``) get ``0.02 / sqrt(2 n_layers)`` so the stream's
    variance does not grow with depth. LayerNorm gains start at 1. open_lm's
    ``1/sqrt(fan_in)`` (the paper's code) is several times larger at this project's CPU
    widths, where it trained worse (the README has the comparison); the two meet near
    d_model 2048.
    """

    config_class = ScalingLMConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: ScalingLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Called by ``post_init`` on every leaf module (and on missing weights when loading)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            std = INIT_STD * getattr(module, "depth_scale", 1.0)
            init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.embed_tokens = embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, projection: nn.Linear) -> None:
        self.lm_head = projection

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every block's activations in the backward pass (a training setting only:
        it is not part of the config and changes no result)."""
        for block in self.blocks:
            block.checkpointed = enabled

    def compile_blocks(self, backend: str | Callable = "inductor") -> None:
        """``torch.compile`` each block's computation, in place (regional compilation).

        The blocks share one piece of code at one shape, so compiling costs about one block's
        graph, not the whole model's; module hooks (FSDP) and the activation checkpoint stay
        outside the compiled code, and parameter names do not change.
        """
        for block in self.blocks:
            block.residual_update = torch.compile(block.residual_update, backend=backend)

    def final_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What ``lm_head`` reads: the final LayerNorm's output, (batch, length, d_model).

        The trainer calls this and computes the output layer and the loss in one fused,
        chunked step (``OutputLoss``) instead of materialising the logits.
        """
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"input of {length} tokens is longer than the context of "
                f"{self.config.context_length} the model was trained with"
            )
        head_dim = self.config.d_model // self.config.n_heads
        cos, sin = rotary_cos_sin(length, head_dim, self.config.rope_theta, input_ids.device)
        x = self.embed_tokens(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits for every position; ``loss`` when ``labels`` are given.

        ``labels`` follow the Hugging Face convention: aligned with ``input_ids`` (usually a
        copy), shifted here, positions labelled IGNORE_INDEX ignored. There is no padding
        mask: the attention is causal only, so right padding is harmless and left padding is
        refused.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "ScalingLM has no padding mask: pass unpadded or right-padded input_ids "
                "without zeros in attention_mask"
            )
        logits = self.lm_head(self.final_hidden_states(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten(),
                ignore_index=IGNORE_INDEX,
            )
        return CausalLMOutput(loss=loss, logits=logits)


def build_model(shape: dict) -> ScalingLM:
    """A freshly initialised model of a ``RunSpec``'s ``shape`` (keys as in the config)."""
    return ScalingLM(ScalingLMConfig(**shape))


class OutputLoss(torch.autograd.Function):
    """Output layer, cross-entropy and z-loss in one pass over row chunks of the logits.

    For small models the (tokens x vocab) logits dominate a step: materialising them, then
    running logsumexp, its backward and the matmul backward each stream the whole array
    through memory. Here each chunk's logits are made, turned into its loss and its gradient
    ``softmax * (1 + 2 z lse) - onehot(target)`` while in cache, and multiplied back into the
    gradients of the hidden states and of the output weight, all in the forward pass; the
    backward only scales them, and memory never holds the whole logits array.
    Training only: the gradients are computed even under ``torch.no_grad``.

    Returns (objective, cross_entropy), both summed over the target positions that are not
    IGNORE_INDEX: objective = sum(ce + z * lse^2) is what to differentiate; the plain
    cross-entropy is for logging and carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss, chunk_rows):
        ctx.hidden_shape = hidden.shape
        hidden = hidden.flatten(0, -2)
        targets = targets.flatten()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        objective = hidden.new_zeros((), dtype=torch.float32)
        cross_entropy = hidden.new_zeros((), dtype=torch.float32)
        for begin in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[begin : begin + chunk_rows]
            chunk_targets = targets[begin : begin + chunk_rows]
            counted = (chunk_targets != IGNORE_INDEX).float()
            target_index = chunk_targets.clamp(min=0)[:, None]
            logits = (rows @ weight.T).float()
            probs = torch.softmax(logits, dim=-1)
            # lse from the largest probability (>= 1/V, so its log is exact): saves a pass.
            lse = logits.amax(dim=-1) - probs.amax(dim=-1).log()
            token_ce = lse - logits.gather(-1, target_index).squeeze(-1)
            cross_entropy += (token_ce * counted).sum()
            objective += ((token_ce + z_loss * lse.square()) * counted).sum()
            probs.mul_((counted * (1 + 2 * z_loss * lse))[:, None])
            probs.scatter_add_(-1, target_index, -counted[:, None])
            grad_hidden[begin : begin + chunk_rows] = probs @ weight
            grad_weight += probs.T @ rows
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(cross_entropy)
        return objective, cross_entropy

    @staticmethod
    def backward(ctx, grad_objective, _grad_cross_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_objective).view(ctx.hidden_shape),
            grad_weight * grad_objective,
            None,
            None,
            None,
        )


def output_loss(
    model: ScalingLM, hidden: torch.Tensor, targets: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``OutputLoss`` of ``model``'s output layer, chunked for the hidden states' device."""
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS[hidden.device.type] // model.config.vocab_size)
    return OutputLoss.apply(hidden, model.lm_head.weight, targets, z_loss, chunk_rows)


class TrainingObjective(nn.Module):
    """The model and its fused output loss behind one ``forward``, which is what gets wrapped.

    DDP prepares its gradient all-reduce and FSDP gathers the parameters in a module's
    ``forward``; the output loss reads the output layer's weight directly, so it has to run
    inside that ``forward`` too. Returns ``OutputLoss``'s (objective, cross_entropy) sums.
    """

    def __init__(self, model: ScalingLM, z_loss: float):
        super().__init__()
        self.model = model
        self.z_loss = z_loss

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.final_hidden_states(inputs)
        return output_loss(self.model, hidden, targets, self.z_loss)


AutoConfig.register(ScalingLMConfig.model_type, ScalingLMConfig, exist_ok=True)
AutoModelForCausalLM.register(ScalingLMConfig, ScalingLM, exist_ok=True)
ScalingLMConfig.register_for_auto_class()
ScalingLM.register_for_auto_class("AutoModelForCausalLM")
