"""The memory model (bytes, one device). B = micro-batch size in sequences, S = max_seq_length, h = hidden size,
q/kv = query/key-value projection widths, I = MLP width a token passes through, L = layers, V = vocabulary,
a = bytes per activation (2 in bf16/fp16, also under 8-bit and 4-bit loading, which compute in 16-bit; 4 in
fp32 on CPU). The activation constants were calibrated against the tensors autograd saves for SmolLM2- and
GPT-2-shaped models with peft LoRA (torch 2.13, transformers 5, peft 0.21):

  weights      16-bit: n_params x 2; fp32: n_params x 4; 8-bit: linear params x 1 + embeddings/head x 2;
               4-bit NF4: linear params x 0.55 (4 bits plus double-quantized block constants) + embeddings/head
               x 2 -- bitsandbytes quantizes linear layers only, the embeddings and lm_head stay 16-bit
  LoRA         lora_params = L x sum over adapted linear layers of r x (in + out);
               training state = lora_params x (4 fp32 weights + 4 fp32 grads + optimizer state: 8 for AdamW,
               2 for 8-bit AdamW, ~1 for factored Adafactor)
  activations  per token and layer, kept for backward:
                 a x (2q + 2kv + 3I)            gated MLP (Llama-style: q, k, v, attention out; gate, up, act)
                 a x (2q + 2kv + 5I + 4h)       GPT-2 style (GELU's intermediates and dropout masks)
               + 4 x 2h                         RMSNorm/LayerNorm inputs, upcast to fp32
               + d x (8 if a = 2 else 4)        d = summed input widths of the adapted layers: peft casts each
                                                input to the fp32 adapter dtype and LoRA dropout copies it
               + 3 x heads x S x a              only for families without flash/SDPA kernels (scores, softmax,
                                                dropout), the one term that grows with S
               with gradient checkpointing each layer keeps only what the checkpoint saves (measured ~4 x h x a
               per token and layer) and one layer's full activations are live at a time while it is recomputed
  logits       V x 12 per token: the loss keeps 16-bit logits, an fp32 copy and the log-softmax (8 bytes), and
               backward adds their fp32 gradient; an engine that chunks the loss needs less (an upper bound)
  total        weights + LoRA state + B x S x (activations + logits)

The budget is free GPU memory x 0.85 minus 512 MiB for the CUDA context and allocator. On CPU the budget is
available RAM x 0.85 when known (unbounded otherwise) and a forward/backward pass holds at most
CPU_TOKENS_PER_PASS[precision] tokens (one sequence at least): on CPU, small passes keep the working set in
cache, which measured faster as well as lighter (SmolLM2, benchmarks/: in fp32, 4096 -> 1024 tokens per pass
took a step from 112 to 150-168 tokens/s and its peak memory from 12.2 to 3.6 GB). bf16-mixed halves the
activations and multiplies faster in larger products: there 2048-token packed passes measured 1.1x 768-token
padded ones (272-290 vs 246-260 tokens/s), and 3072 or 4096 were no faster (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmbox.facts import LinearShape, ModelFacts
from llmbox.planning import distribution
from llmbox.planning.distribution import Strategy
from llmbox.planning.terms import (
    CPU_CHECKPOINTED_SHARE,
    CPU_PASS_RESIDENT,
    CPU_PRECISION_SHARE,
    LOGIT_BYTES_PER_VOCAB_ENTRY,
    NF4_BYTES_PER_PARAM,
    OPTIMIZER_STATE_BYTES,
    Quant,
)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory model's numbers for the chosen plan (bytes). `budget_bytes=None`: unknown (CPU)."""

    free_bytes: int | None
    budget_bytes: int | None
    weights_bytes: int
    lora_params: int
    lora_state_bytes: int
    activation_bytes: int
    logits_bytes: int
    total_bytes: int


def weight_bytes(model: ModelFacts, quant: Quant, param_bytes: int) -> int:
    """Bytes of the frozen base weights; quantization touches linear layers only."""
    if quant == "none":
        return model.n_params * param_bytes
    unquantized = (model.embedding_params + model.head_params) * param_bytes  # loaded in the plan's dtype
    per_param = 1.0 if quant == "8bit" else NF4_BYTES_PER_PARAM
    return int(model.quantizable_params * per_param) + unquantized


def adapted_linears(model: ModelFacts, targets: tuple[str, ...] | None) -> tuple[LinearShape, ...]:
    """The layer's linear layers LoRA wraps; a target list naming none of them falls back to all of them."""
    if targets is None:
        return model.layer_linears
    chosen = tuple(s for s in model.layer_linears if s.name in targets)
    return chosen or model.layer_linears


def lora_param_count(model: ModelFacts, targets: tuple[str, ...] | None, rank: int) -> int:
    per_layer = sum(rank * (s.in_features + s.out_features) for s in adapted_linears(model, targets))
    return model.n_layers * per_layer


def lora_state_bytes(lora_params: int, optimizer: str) -> int:
    return int(lora_params * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer]))


def activation_bytes_per_token(
    model: ModelFacts,
    targets: tuple[str, ...] | None,
    act_bytes: int,
    checkpointing: bool,
    seq: int,
    eager_attention: bool,
) -> int:
    """Activations kept for backward, per token of a micro-batch, summed over layers (see the module docstring)."""
    h = model.hidden_size
    q, kv = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    inter = model.active_intermediate_size
    tensors = 2 * q + 2 * kv + (3 * inter if model.gated_mlp else 5 * inter + 4 * h)
    lora_inputs = sum(s.in_features for s in adapted_linears(model, targets))
    one_layer = act_bytes * tensors + 4 * 2 * h + lora_inputs * (8 if act_bytes == 2 else 4)
    if eager_attention:
        one_layer += 3 * model.n_heads * seq * act_bytes
    if checkpointing:
        return model.n_layers * 4 * h * act_bytes + one_layer
    return model.n_layers * one_layer


def logits_bytes_per_token(model: ModelFacts) -> int:
    return model.vocab_size * LOGIT_BYTES_PER_VOCAB_ENTRY


@dataclass(frozen=True)
class Setup:
    """One way to load and train the model, priced per the memory model."""

    quant: Quant
    rank: int
    optimizer: str
    strategy: Strategy
    fixed_bytes: int  # weights + LoRA state (this process's share of them under FSDP2)
    weights_bytes: int
    lora_params: int
    lora_state_bytes: int
    act_per_token: dict[bool, int]  # by gradient checkpointing on/off
    logits_per_token: int

    def per_sequence(self, seq: int, checkpointing: bool) -> int:
        return seq * (self.act_per_token[checkpointing] + self.logits_per_token)

    def need(self, seq: int, batch: int, checkpointing: bool) -> int:
        return self.fixed_bytes + batch * self.per_sequence(seq, checkpointing)

    def need_tokens(self, tokens: int, checkpointing: bool) -> int:
        return self.fixed_bytes + tokens * (self.act_per_token[checkpointing] + self.logits_per_token)

    def max_batch(self, budget: int | None, seq: int, checkpointing: bool) -> int | None:
        """Most sequences per micro-batch that fit; `None` when the budget is unknown."""
        if budget is None:
            return None
        return max(0, (budget - self.fixed_bytes) // self.per_sequence(seq, checkpointing))


def price(
    model: ModelFacts,
    targets: tuple[str, ...] | None,
    quant: Quant,
    rank: int,
    optimizer: str,
    param_bytes: int,
    seq: int,
    eager_attention: bool,
    strategy: Strategy = "single",
    world_size: int = 1,
    cpu_precision: str | None = None,
) -> Setup:
    """`cpu_precision`: training on CPU in this precision; passes are then priced as resident memory
    (CPU_PASS_RESIDENT), the number a CPU run's limit applies to."""
    weights = weight_bytes(model, quant, param_bytes)
    n_lora = lora_param_count(model, targets, rank)
    state = lora_state_bytes(n_lora, optimizer)
    fixed = weights + state
    act_per_token = {
        ckpt: activation_bytes_per_token(model, targets, param_bytes, ckpt, seq, eager_attention)
        for ckpt in (False, True)
    }
    logits = logits_bytes_per_token(model)
    if cpu_precision is not None:
        share = CPU_PASS_RESIDENT[quant] * CPU_PRECISION_SHARE.get(cpu_precision, 1.0)
        resident = share * (act_per_token[False] + logits)
        act_per_token = {False: int(resident), True: int(resident * CPU_CHECKPOINTED_SHARE)}
        logits = 0  # inside the resident figure
    if strategy == "fsdp2":
        whole = (model.embedding_params + model.head_params) * (param_bytes if quant == "none" else 2)
        fixed = distribution.sharded_bytes(weights, whole, state, model.n_layers, world_size)
    return Setup(
        quant=quant,
        rank=rank,
        optimizer=optimizer,
        strategy=strategy,
        fixed_bytes=fixed,
        weights_bytes=weights,
        lora_params=n_lora,
        lora_state_bytes=state,
        act_per_token=act_per_token,
        logits_per_token=logits,
    )
