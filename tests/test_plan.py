"""The training planner: parameter counts from config.json, and every planning rule, on hand-made hardware."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from llmbox.errors import UserError
from llmbox.facts import (
    DataFacts,
    GpuFacts,
    HostFacts,
    ModelFacts,
    model_facts_from_config,
    read_gpu_facts,
    read_host_facts,
)
from llmbox.plan import PlanFlags, TrainingPlan, plan
from llmbox.planning.batches import seq_bucket
from llmbox.planning.fitting import lora_rank_for
from llmbox.planning.memory import activation_bytes_per_token, lora_param_count, weight_bytes
from llmbox.planning.schedule import base_learning_rate
from llmbox.planning.terms import CPU_TOKENS_PER_PASS, GiB

SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA2_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
QWEN3_06B = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
PHI3_MINI = {
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
# gemma-3-4b-it's config.json: a sparse text_config (the rest are Gemma3TextConfig defaults) and a SigLIP tower
GEMMA3_4B = {
    "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}

H100 = GpuFacts(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (9, 0))
RTX4090 = GpuFacts(0, "NVIDIA GeForce RTX 4090", 24 * GiB, 23 * GiB, (8, 9))
T4 = GpuFacts(0, "Tesla T4", 16 * GiB, 15 * GiB, (7, 5))
GPU_8GB = GpuFacts(0, "NVIDIA GeForce RTX 3070", 8 * GiB, 7 * GiB, (8, 6))

INSTRUCTIONS = DataFacts(n_train=1000, n_val=0, task="instruction", mean_tokens=180.0, p95_tokens=400, max_tokens=600)
TEXT = DataFacts(n_train=1000, n_val=0, task="text-generation", mean_tokens=300.0, p95_tokens=700, max_tokens=900)


def facts(config: dict[str, Any]) -> ModelFacts:
    return model_facts_from_config(config)


SMOL = facts(SMOLLM2_135M)
L8B = facts(LLAMA3_8B)
L70B = facts(LLAMA2_70B)


def make_plan(
    model: ModelFacts = SMOL,
    gpus: tuple[GpuFacts, ...] = (H100,),
    data: DataFacts = INSTRUCTIONS,
    host: HostFacts | None = None,
    **flags: Any,
) -> TrainingPlan:
    return plan(model, gpus, data, PlanFlags(**flags), host)


def fits(p: TrainingPlan) -> bool:
    return p.memory.budget_bytes is None or p.memory.total_bytes <= p.memory.budget_bytes


# --- parameter counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected", "tolerance"),
    [
        (SMOLLM2_135M, 134.5e6, 0.01),
        (LLAMA3_8B, 8.03e9, 0.01),
        (QWEN25_05B, 494e6, 0.02),
        (QWEN3_06B, 596_049_920, 0.01),  # q/k norms, head_dim 128 != hidden / heads
        (GPT2, 124_439_808, 0.01),  # learned positions, 2-matrix MLP, biases, tied head
        (PHI3_MINI, 3_821_079_552, 0.01),  # fused qkv and gate_up
        (MIXTRAL_8X7B, 46.7e9, 0.01),  # eight experts per layer
        (GEMMA3_4B, 4.30e9, 0.02),  # text_config defaults plus the vision tower
        (LLAMA2_70B, 68.98e9, 0.01),
    ],
    ids=["smollm2-135m", "llama3-8b", "qwen2.5-0.5b", "qwen3-0.6b", "gpt2", "phi3-mini", "mixtral", "gemma3-4b", "70b"],
)
def test_parameter_count_from_config(config: dict[str, Any], expected: float, tolerance: float) -> None:
    assert facts(config).n_params == pytest.approx(expected, rel=tolerance)


def test_tied_embeddings_are_counted_once() -> None:
    untied = facts({**SMOLLM2_135M, "tie_word_embeddings": False})
    assert untied.n_params - SMOL.n_params == 49152 * 576
    assert SMOL.head_params == 0 and untied.head_params == 49152 * 576


def test_model_facts_fields() -> None:
    assert (L8B.n_layers, L8B.hidden_size, L8B.vocab_size, L8B.max_positions) == (32, 4096, 128256, 8192)
    assert (L8B.n_kv_heads, L8B.head_dim, L8B.dtype) == (8, 128, "bfloat16")
    assert L8B.handler == "llama" and "llama" in L8B.handler_reason
    gemma = facts(GEMMA3_4B)
    assert (gemma.handler, gemma.hidden_size, gemma.head_dim, gemma.vocab_size) == ("gemma3", 2560, 256, 262208)
    assert gemma.max_positions == 131072
    assert facts(GPT2).max_positions == 1024
    assert facts({**SMOLLM2_135M, "model_type": "falcon"}).handler == "generic"
    assert {s.name for s in facts(PHI3_MINI).layer_linears} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_config_without_sizes_is_a_user_error() -> None:
    with pytest.raises(UserError, match="hidden size"):
        model_facts_from_config({"model_type": "llama", "num_hidden_layers": 2})


# --- LoRA rank, alpha, targets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_params", "rank"),
    [
        (135e6, 8),
        (0.99e9, 8),
        (1.0e9, 16),
        (2.9e9, 16),
        (3e9, 32),
        (6.9e9, 32),
        (8e9, 64),
        (12.9e9, 64),
        (13e9, 128),
        (29e9, 128),
        (30e9, 256),
        (70e9, 256),
    ],
)
def test_lora_rank_by_size(n_params: float, rank: int) -> None:
    assert lora_rank_for(int(n_params)) == rank


def test_small_model_on_h100_plain_lora_bf16() -> None:
    p = make_plan(SMOL, (H100,))
    assert (p.method, p.load_in_4bit, p.load_in_8bit, p.precision) == ("lora", False, False, "bf16")
    assert (p.lora_r, p.lora_alpha, p.lora_dropout) == (8, 16, 0.05)
    assert p.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert not p.gradient_checkpointing
    assert p.device == "cuda" and p.gpu_index == 0
    assert p.warnings == ()
    assert fits(p)


def test_8b_gets_rank_64_and_alpha_128() -> None:
    p = make_plan(L8B, (H100,))
    assert (p.lora_r, p.lora_alpha, p.method) == (64, 128, "lora")


def test_lora_flags_override_rank_and_alpha() -> None:
    assert (make_plan(lora_r=32).lora_r, make_plan(lora_r=32).lora_alpha) == (32, 64)
    p = make_plan(lora_r=4, lora_alpha=8)
    assert (p.lora_r, p.lora_alpha) == (4, 8)
    assert p.reasons["lora_r"] == "--lora-r" and p.reasons["lora_alpha"] == "--lora-alpha"


def test_generic_handler_targets_all_linear_layers() -> None:
    p = make_plan(facts({**SMOLLM2_135M, "model_type": "falcon"}))
    assert p.target_modules is None
    assert "every linear layer" in p.reasons["target_modules"]


def test_lora_params_follow_targets_and_rank() -> None:
    # Llama layer: q 576->576, k/v 576->192, o 576->576, gate/up 576->1536, down 1536->576
    per_layer_8 = 8 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
    assert lora_param_count(SMOL, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 8) == (
        30 * per_layer_8
    )
    assert lora_param_count(SMOL, ("q_proj", "v_proj"), 16) == 30 * 16 * (1152 + 768)


# --- precision -----------------------------------------------------------------------------------------------


def test_no_gpu_is_fp32_cpu() -> None:
    p = make_plan(SMOL, ())
    assert (p.device, p.precision, p.method, p.load_in_4bit, p.gpu_index) == ("cpu", "fp32", "lora", False, None)
    assert p.optimizer == "adamw_torch"


def test_cpu_with_native_bf16_multiplies_in_bf16_over_fp32_weights() -> None:
    p = make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=16 * GiB, cpu_bf16=True))
    assert p.precision == "bf16-mixed"
    assert "native bf16" in p.reasons["precision"]
    assert p.memory.weights_bytes == make_plan(SMOL, ()).memory.weights_bytes  # the weights stay fp32
    forced = make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=16 * GiB, cpu_bf16=True), precision="fp32")
    assert (forced.precision, forced.reasons["precision"]) == ("fp32", "--precision fp32")
    assert make_plan(SMOL, (), precision="bf16-mixed").precision == "bf16-mixed"  # asked for, without native bf16
    assert make_plan(SMOL, (H100,), precision="fp32").precision == "fp32"
    with pytest.raises(UserError, match="bf16-mixed is for CPUs"):
        make_plan(SMOL, (H100,), precision="bf16-mixed")
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        make_plan(SMOL, (), precision="fp8")


def test_old_gpu_gets_fp16() -> None:
    p = make_plan(SMOL, (T4,))
    assert p.precision == "fp16"
    assert p.warnings == ()


def test_bf16_preferring_handler_on_old_gpu_warns() -> None:
    gemma = facts({
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    })  # fmt: skip
    on_t4 = make_plan(gemma, (T4,))
    assert on_t4.precision == "fp16"
    assert any("bf16" in w and "gemma3" in w for w in on_t4.warnings)
    on_4090 = make_plan(gemma, (RTX4090,))
    assert on_4090.precision == "bf16"
    assert not any("bf16" in w for w in on_4090.warnings)


# --- memory model, QLoRA switch, checkpointing ---------------------------------------------------------------


def test_8b_on_t4_switches_to_qlora_fp16_with_checkpointing() -> None:
    p = make_plan(L8B, (T4,))
    assert (p.method, p.load_in_4bit, p.precision, p.gradient_checkpointing) == ("qlora", True, "fp16", True)
    assert p.optimizer == "paged_adamw_8bit"
    assert any("QLoRA" in w for w in p.warnings)
    assert "QLoRA" in p.reasons["method"]
    assert fits(p)
    assert p.batch_size * p.gradient_accumulation_steps == p.effective_batch_size >= 16


def test_70b_on_one_24gb_gpu_is_a_user_error_with_numbers() -> None:
    with pytest.raises(UserError) as caught:
        make_plan(L70B, (RTX4090,))
    message = str(caught.value)
    assert "GiB" in message and "QLoRA" in message
    assert "23.0 GiB free" in message  # the GPU's free memory, next to what the model needs


def test_70b_on_h100_fits_with_qlora_by_lowering_rank() -> None:
    p = make_plan(L70B, (H100,))
    assert p.method == "qlora"
    assert p.lora_r < 256 and p.lora_alpha == 2 * p.lora_r
    assert any("rank lowered" in w for w in p.warnings)
    assert fits(p)


def test_forced_lora_that_does_not_fit_suggests_qlora() -> None:
    with pytest.raises(UserError, match="--method qlora"):
        make_plan(L8B, (T4,), method="lora")


def test_method_qlora_forces_4bit_even_when_16bit_fits() -> None:
    p = make_plan(SMOL, (H100,), method="qlora")
    assert (p.method, p.load_in_4bit, p.gradient_checkpointing, p.optimizer) == (
        "qlora",
        True,
        True,
        "paged_adamw_8bit",
    )
    assert p.reasons["method"].startswith("--method qlora")


def test_use_8bit_loads_weights_in_8bit() -> None:
    p = make_plan(L8B, (RTX4090,), use_8bit=True)
    assert (p.method, p.load_in_8bit, p.load_in_4bit) == ("lora", True, False)
    # 1 byte per linear parameter, embeddings and head kept in 16-bit
    assert p.memory.weights_bytes == L8B.quantizable_params + 2 * (L8B.embedding_params + L8B.head_params)


def test_qlora_and_8bit_together_is_a_user_error() -> None:
    with pytest.raises(UserError, match="choose one"):
        make_plan(method="qlora", use_8bit=True)


def test_weight_bytes_per_precision() -> None:
    assert weight_bytes(L8B, "none", 2) == 2 * L8B.n_params
    assert weight_bytes(L8B, "none", 4) == 4 * L8B.n_params
    nf4 = weight_bytes(L8B, "4bit", 2)
    assert nf4 == int(L8B.quantizable_params * 0.55) + 2 * (L8B.embedding_params + L8B.head_params)
    assert 5 * GiB < nf4 < 6 * GiB


def test_checkpointing_shrinks_activations() -> None:
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    plain = activation_bytes_per_token(L8B, targets, 2, False, 1024, False)
    checkpointed = activation_bytes_per_token(L8B, targets, 2, True, 1024, False)
    assert checkpointed * 5 < plain
    # eager attention adds the score matrices, which grow with the sequence
    assert activation_bytes_per_token(L8B, targets, 2, False, 2048, True) > plain


def test_checkpointing_turns_on_when_activations_do_not_fit() -> None:
    roomy = make_plan(L8B, (H100,))
    assert roomy.method == "lora" and not roomy.gradient_checkpointing
    tight = make_plan(L8B, (H100,), max_seq_length=8192)
    assert tight.method == "lora" and tight.gradient_checkpointing
    assert "do not fit" in tight.reasons["gradient_checkpointing"]
    assert fits(tight)


def test_small_gpu_gets_a_plan_that_fits() -> None:
    p = make_plan(facts(QWEN25_05B), (GPU_8GB,))
    assert p.precision == "bf16"
    assert fits(p)
    assert p.memory.total_bytes > p.memory.weights_bytes + p.memory.lora_state_bytes


def test_plan_uses_the_gpu_with_most_free_memory() -> None:
    busy = dataclasses.replace(H100, index=0, free_bytes=10 * GiB)
    idle = dataclasses.replace(H100, index=1, free_bytes=78 * GiB)
    p = make_plan(L8B, (busy, idle))
    assert p.gpu_index == 1
    assert "2 GPUs" in p.reasons["device"]


# --- sequence length and batch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "bucket"), [(1, 64), (64, 64), (65, 128), (300, 512), (513, 768), (769, 1024), (1100, 1536)]
)
def test_seq_bucket(tokens: int, bucket: int) -> None:
    assert seq_bucket(tokens) == bucket


def test_seq_length_follows_the_data_not_the_model_limit() -> None:
    short = DataFacts(n_train=100, n_val=0, task="instruction", mean_tokens=120.0, p95_tokens=250, max_tokens=300)
    assert make_plan(data=short).max_seq_length == 512


def test_seq_length_capped_by_handler_and_model() -> None:
    long = DataFacts(n_train=100, n_val=0, task="instruction", mean_tokens=3000.0, p95_tokens=5000, max_tokens=6000)
    gpt2 = make_plan(facts(GPT2), data=long)
    assert gpt2.max_seq_length == 1024
    assert any("truncated" in w for w in gpt2.warnings)
    assert make_plan(facts({**SMOLLM2_135M, "max_position_embeddings": 2048}), data=long).max_seq_length == 2048


def test_one_outlier_does_not_set_the_seq_length() -> None:
    outlier = DataFacts(n_train=100, n_val=0, task="instruction", mean_tokens=150.0, p95_tokens=300, max_tokens=4000)
    p = make_plan(data=outlier)
    assert p.max_seq_length == 512
    assert any("truncated" in w for w in p.warnings)


def test_seq_length_flag_wins_but_not_past_the_model() -> None:
    assert make_plan(max_seq_length=2048).max_seq_length == 2048
    p = make_plan(facts(GPT2), max_seq_length=4096)
    assert p.max_seq_length == 1024
    assert any("4096" in w for w in p.warnings)


def test_effective_batch_is_about_16() -> None:
    p = make_plan(L8B, (T4,))
    assert p.effective_batch_size == 16
    assert p.batch_size & (p.batch_size - 1) == 0  # a power of two


def test_batch_flags_win() -> None:
    p = make_plan(batch_size=2, gradient_accumulation_steps=3)
    assert (p.batch_size, p.gradient_accumulation_steps, p.effective_batch_size) == (2, 3, 6)
    # --batch-size alone is the examples per optimizer step, as per_device_train_batch_size is in TRL
    only_batch = make_plan(batch_size=4)
    assert (only_batch.batch_size, only_batch.gradient_accumulation_steps) == (4, 1)
    assert "examples per step" in only_batch.reasons["gradient_accumulation_steps"]
    only_accumulation = make_plan(gradient_accumulation_steps=8)
    assert (only_accumulation.batch_size, only_accumulation.gradient_accumulation_steps) == (2, 8)


def test_too_big_batch_flag_warns() -> None:
    p = make_plan(L8B, (T4,), batch_size=512)
    assert p.batch_size == 512
    assert any("--batch-size 512" in w for w in p.warnings)


def test_cpu_batch_from_a_token_budget() -> None:
    data = DataFacts(n_train=500, n_val=0, task="instruction", mean_tokens=200.0, p95_tokens=400, max_tokens=500)
    p = make_plan(SMOL, (), data=data)
    assert (p.precision, p.max_seq_length) == ("fp32", 512)
    # a micro-batch takes about as many mean-length examples as one pass holds: 1024 // 200 = 5, so 4
    assert p.batch_size == 4
    assert p.max_forward_tokens == CPU_TOKENS_PER_PASS["fp32"] == 1024
    assert p.batch_size * p.gradient_accumulation_steps == 16
    assert not p.gradient_checkpointing
    assert p.memory.budget_bytes is None


def test_cpu_passes_are_larger_in_bf16_mixed() -> None:
    data = DataFacts(n_train=500, n_val=0, task="instruction", mean_tokens=200.0, p95_tokens=400, max_tokens=500)
    fp32 = make_plan(SMOL, (), data=data, host=HostFacts(cpu_bf16=False))
    mixed = make_plan(SMOL, (), data=data, host=HostFacts(cpu_bf16=True))
    assert (fp32.precision, mixed.precision) == ("fp32", "bf16-mixed")
    assert mixed.max_forward_tokens == CPU_TOKENS_PER_PASS["bf16-mixed"] == 2 * fp32.max_forward_tokens
    assert (fp32.batch_size, mixed.batch_size) == (4, 8)  # 2048 // 200 = 10 examples a pass: 8
    assert "2048 tokens in bf16-mixed" in mixed.reasons["max_forward_tokens"]


def test_a_large_batch_flag_on_cpu_runs_in_bounded_forward_passes() -> None:
    data = DataFacts(n_train=400, n_val=0, task="instruction", mean_tokens=370.0, p95_tokens=700, max_tokens=717)
    eight, one = make_plan(SMOL, (), data=data, batch_size=8), make_plan(SMOL, (), data=data, batch_size=1)
    assert (eight.max_seq_length, eight.batch_size) == (768, 8)  # 8 examples per micro-batch, as asked
    assert eight.max_forward_tokens == CPU_TOKENS_PER_PASS["fp32"] < 8 * 768  # no pass holds more than that
    # activations are held for one pass at a time, so --batch-size 8 needs what a pass of 1024 tokens needs
    assert eight.memory.activation_bytes / one.memory.activation_bytes == pytest.approx(1024 / 768)


def test_on_a_gpu_a_pass_holds_what_fits() -> None:
    p = make_plan(L8B, (T4,), batch_size=512)
    assert p.max_seq_length <= p.max_forward_tokens < 512 * p.max_seq_length
    assert fits(p)  # the estimate counts one pass, which fits; 512 rows at once would not


def test_cpu_with_too_little_memory_is_a_user_error() -> None:
    with pytest.raises(UserError, match="weights and LoRA state alone need"):
        make_plan(L8B, (), host=HostFacts(cpu_memory_bytes=4 * GiB))
    small = make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=64 * GiB))
    assert fits(small)


def test_cpu_switches_to_qlora_when_fp32_weights_do_not_fit_memory() -> None:
    """bitsandbytes runs on CPUs: the planner falls back to 4-bit there exactly as on a GPU, and says why."""
    p = make_plan(L8B, (), host=HostFacts(cpu_memory_bytes=32 * GiB, cpu_bf16=False))
    assert (p.method, p.load_in_4bit, p.precision) == ("qlora", True, "fp32")
    assert "fp32 weights (29.9 GiB)" in p.reasons["method"] and "system memory" in p.reasons["method"]
    assert any("switched to QLoRA" in w for w in p.warnings)
    assert p.optimizer == "adamw_torch" and "host memory" in p.reasons["optimizer"]
    assert fits(p)
    roomy = make_plan(L8B, (), host=HostFacts(cpu_memory_bytes=256 * GiB, cpu_bf16=False))
    assert roomy.method == "lora" and not roomy.load_in_4bit
    with pytest.raises(UserError, match="try --method qlora"):
        make_plan(L8B, (), host=HostFacts(cpu_memory_bytes=32 * GiB), method="lora")


def test_quantized_methods_plan_on_cpu_without_warnings() -> None:
    for flags in ({"method": "qlora"}, {"use_8bit": True}, {"optimizer": "adamw_bnb_8bit"}):
        p = make_plan(SMOL, (), **flags)
        assert not p.warnings, (flags, p.warnings)
    assert make_plan(SMOL, (), use_8bit=True).load_in_8bit
    paged = make_plan(SMOL, (), optimizer="paged_adamw_8bit")
    assert paged.optimizer == "paged_adamw_8bit" and "unpaged" in paged.reasons["optimizer"]


# --- learning rate and modes ---------------------------------------------------------------------------------


def test_base_learning_rate_by_size() -> None:
    assert base_learning_rate(135_000_000) == 2e-4
    assert base_learning_rate(8_000_000_000) == 1e-4
    assert base_learning_rate(70_000_000_000) == 5e-5


@pytest.mark.parametrize(
    ("mode", "factor"), [("slow", 0.5), ("medium", 1.0), ("fast", 2.0), ("non-stop", 0.3), ("adaptive", 1.0)]
)
def test_learning_rate_scaled_by_mode(mode: str, factor: float) -> None:
    assert make_plan(SMOL, mode=mode).learning_rate == pytest.approx(2e-4 * factor)
    assert make_plan(L8B, mode=mode).learning_rate == pytest.approx(1e-4 * factor)


def test_large_model_learning_rate_and_flag_wins() -> None:
    assert make_plan(L70B, (H100,)).learning_rate == pytest.approx(5e-5)
    qlora = make_plan(L8B, (T4,))
    assert qlora.method == "qlora" and qlora.learning_rate == pytest.approx(1e-4)
    p = make_plan(mode="fast", learning_rate=3e-5)
    assert p.learning_rate == 3e-5 and p.reasons["learning_rate"] == "--learning-rate"


def test_mode_epochs_and_eval_interval() -> None:
    plans = {mode: make_plan(mode=mode) for mode in ("slow", "medium", "fast", "non-stop", "adaptive")}
    assert {mode: p.epochs for mode, p in plans.items()} == {
        "slow": 5,
        "medium": 3,
        "fast": 1,
        "non-stop": None,
        "adaptive": 3,
    }
    steps = plans["medium"].steps_per_epoch
    assert steps == 57  # 900 training examples (100 held out) / 16 per step
    assert plans["slow"].eval_steps == steps // 2
    assert plans["medium"].eval_steps == steps // 4
    assert plans["fast"].eval_steps == steps // 8
    assert plans["adaptive"].eval_steps == steps // 4
    assert plans["adaptive"].adaptive and not plans["medium"].adaptive
    assert make_plan().mode == "medium"


def test_eval_interval_is_at_least_one_step() -> None:
    tiny = DataFacts(n_train=12, n_val=0, task="instruction", mean_tokens=50.0, p95_tokens=60, max_tokens=64)
    assert make_plan(data=tiny, mode="fast").eval_steps == 1


def test_epochs_flag_wins() -> None:
    assert make_plan(mode="fast", epochs=7).epochs == 7
    assert make_plan(mode="non-stop", epochs=2).epochs == 2
    assert make_plan(circular=True, epochs=4).epochs == 4


def test_circular_mode() -> None:
    small = DataFacts(n_train=5, n_val=0, task="instruction", mean_tokens=30.0, p95_tokens=40, max_tokens=40)
    p = make_plan(data=small, circular=True)
    assert p.circular and p.epochs == 100
    assert p.batch_growth == 2.0
    assert p.batch_size <= p.max_batch_size <= 5
    assert p.auto_stop and p.perfect_loss == 0.01
    assert p.eval_steps == p.steps_per_epoch
    assert make_plan(data=small, circular=True, max_circular_epochs=20).epochs == 20
    assert make_plan(data=small).batch_growth == 1.0


def test_circular_mode_memorises_with_small_growing_batches_and_a_higher_rate() -> None:
    dozen = DataFacts(n_train=12, n_val=0, task="instruction", mean_tokens=70.0, p95_tokens=90, max_tokens=100)
    p = make_plan(SMOL, (), data=dozen, circular=True)
    assert (p.batch_size, p.gradient_accumulation_steps, p.max_batch_size) == (4, 1, 12)
    assert p.learning_rate == pytest.approx(10 * make_plan(SMOL, (), data=dozen).learning_rate)
    assert "circular" in p.reasons["learning_rate"] and "circular" in p.reasons["batch_size"]
    asked = make_plan(SMOL, (), data=dozen, circular=True, batch_size=2, learning_rate=1e-4)
    assert (asked.batch_size, asked.gradient_accumulation_steps, asked.learning_rate) == (2, 1, 1e-4)


def test_force_epochs_turns_every_auto_stop_off() -> None:
    p = make_plan(force_epochs=True, epochs=4)
    assert p.epochs == 4 and not p.auto_stop
    assert (p.perfect_loss, p.overfitting_threshold, p.patience, p.perplexity_limit) == (None, None, None, None)
    assert not make_plan(force_epochs=True, data=TEXT).auto_stop
    assert make_plan(force_epochs=True, mode="slow").epochs == 5
    with pytest.raises(UserError, match="--epochs"):
        make_plan(force_epochs=True, mode="non-stop")


# --- auto-stop thresholds ------------------------------------------------------------------------------------


def test_instruction_thresholds() -> None:
    p = make_plan(data=INSTRUCTIONS)
    assert p.auto_stop
    assert (p.perfect_loss, p.overfitting_threshold, p.patience, p.perplexity_limit) == (0.01, 0.10, 3, None)


def test_text_generation_thresholds() -> None:
    p = make_plan(data=TEXT)
    assert (p.perfect_loss, p.overfitting_threshold, p.patience, p.perplexity_limit) == (0.5, 0.20, 5, 100)


def test_threshold_flags_win() -> None:
    p = make_plan(data=TEXT, patience=9, overfitting_threshold=0.05)
    assert (p.patience, p.overfitting_threshold, p.perfect_loss) == (9, 0.05, 0.5)


def test_no_validation_turns_overfitting_checks_off() -> None:
    tiny = DataFacts(n_train=5, n_val=0, task="instruction", mean_tokens=30.0, p95_tokens=40, max_tokens=40)
    p = make_plan(data=tiny)
    assert (p.validation_split, p.n_val, p.n_train) == (0.0, 0, 5)
    assert p.overfitting_threshold is None and p.patience is None and p.perfect_loss == 0.01
    assert any("no validation" in w for w in p.warnings)


# --- validation split, optimizer, seed, checkpoints ----------------------------------------------------------


def test_validation_split() -> None:
    p = make_plan()
    assert (p.validation_split, p.n_train, p.n_val) == (0.1, 900, 100)
    assert make_plan(validation_split=0.2).n_val == 200
    separate = make_plan(data=dataclasses.replace(INSTRUCTIONS, n_val=50))
    assert (separate.validation_split, separate.n_train, separate.n_val) == (0.0, 1000, 50)
    huge = make_plan(data=dataclasses.replace(INSTRUCTIONS, n_train=100_000))
    assert huge.n_val == 2000


def test_optimizer_defaults_and_flag() -> None:
    assert make_plan(SMOL, (H100,)).optimizer == "adamw_torch"
    assert make_plan(L8B, (T4,)).optimizer == "paged_adamw_8bit"
    assert make_plan(L8B, (T4,), optimizer="adafactor").optimizer == "adafactor"
    with pytest.raises(UserError, match="unknown optimizer"):
        make_plan(optimizer="sgd")


def test_seed_checkpoints_and_max_steps() -> None:
    p = make_plan()
    assert (p.seed, p.save_total_limit, p.max_steps) == (42, 3, None)
    assert p.save_steps == p.eval_steps
    flagged = make_plan(seed=7, max_steps=100)
    assert (flagged.seed, flagged.max_steps) == (7, 100)


@pytest.mark.parametrize(
    "flags",
    [
        {"mode": "turbo"},
        {"method": "full"},
        {"optimizer": "sgd"},
        {"epochs": 0},
        {"lora_r": 0},
        {"validation_split": 1.0},
        {"learning_rate": -1.0},
        {"max_circular_epochs": 0},
    ],
)
def test_bad_flags_are_user_errors(flags: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        make_plan(**flags)


def test_no_training_examples_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no training examples"):
        make_plan(data=dataclasses.replace(INSTRUCTIONS, n_train=0))


# --- reasons and JSON ----------------------------------------------------------------------------------------


def test_every_decision_has_a_reason() -> None:
    p = make_plan(L8B, (T4,))
    decisions: tuple[str, ...] = (
        "device",
        "method",
        "precision",
        "lora_r",
        "lora_alpha",
        "target_modules",
        "max_seq_length",
    )
    decisions += ("batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "learning_rate")
    decisions += ("optimizer", "epochs", "eval_steps", "auto_stop", "validation_split", "seed", "save_total_limit")
    for key in decisions:
        assert p.reasons.get(key), key


def test_to_dict_is_json() -> None:
    p = make_plan(L8B, (T4,))
    data = json.loads(json.dumps(p.to_dict()))
    assert data["method"] == "qlora" and data["lora_r"] == 64
    assert data["memory"]["total_bytes"] == p.memory.total_bytes
    assert data["reasons"]["method"] == p.reasons["method"]
    assert data["warnings"] == list(p.warnings)
    assert data["target_modules"][0] == "q_proj"


def test_plan_is_deterministic() -> None:
    assert make_plan(L8B, (T4,)) == make_plan(L8B, (T4,))


# --- GPU and host facts ----------------------------------------------------------------------------------------


class _NVMLError(Exception):
    pass


def _fake_pynvml(devices: list[dict[str, Any]], fail_init: bool = False) -> types.SimpleNamespace:
    """Stands in for the pynvml module: the calls read_gpu_facts makes, answered from `devices`."""
    calls = {"shutdown": 0}

    def init() -> None:
        if fail_init:
            raise _NVMLError("Driver Not Loaded")

    def shutdown() -> None:
        calls["shutdown"] += 1

    return types.SimpleNamespace(
        NVMLError=_NVMLError,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda i: devices[i],
        nvmlDeviceGetUUID=lambda d: d["uuid"],
        nvmlDeviceGetName=lambda d: d["name"],
        nvmlDeviceGetMemoryInfo=lambda d: types.SimpleNamespace(total=d["total"], free=d["free"]),
        nvmlDeviceGetCudaComputeCapability=lambda d: d["cc"],
        calls=calls,
    )


DEVICES = [
    {"uuid": "GPU-aaaa", "name": b"Tesla T4", "total": 16 * GiB, "free": 15 * GiB, "cc": (7, 5)},
    {"uuid": "GPU-bbbb", "name": "NVIDIA H100", "total": 80 * GiB, "free": 70 * GiB, "cc": (9, 0)},
]


def test_read_gpu_facts_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(DEVICES)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = read_gpu_facts()
    assert gpus == [
        GpuFacts(0, "Tesla T4", 16 * GiB, 15 * GiB, (7, 5)),
        GpuFacts(1, "NVIDIA H100", 80 * GiB, 70 * GiB, (9, 0)),
    ]
    assert fake.calls["shutdown"] == 1


@pytest.mark.parametrize(("visible", "indices"), [("1", [1]), ("GPU-bb", [1]), ("1,0", [1, 0]), ("", []), ("-1", [])])
def test_read_gpu_facts_honours_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str, indices: list[int]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(DEVICES))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.index for g in read_gpu_facts()] == indices


def test_read_gpu_facts_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(DEVICES, fail_init=True))
    assert read_gpu_facts() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert read_gpu_facts() == []


def test_read_host_facts(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   16000000 kB\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert read_host_facts(meminfo, cpuinfo) == HostFacts(16_000_000 * 1024, cpu_bf16=False)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert read_host_facts(meminfo, cpuinfo).cpu_bf16
    assert not read_host_facts(meminfo, tmp_path / "missing").cpu_bf16


def test_planner_does_not_import_torch() -> None:
    code = "import llmbox.plan, llmbox.facts, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- distribution ------------------------------------------------------------------------------------------


def test_one_process_unless_asked() -> None:
    single = make_plan()
    assert (single.strategy, single.world_size) == ("single", 1)


@pytest.mark.parametrize("gpus", [(H100,), ()], ids=["gpu", "cpu"])
def test_several_processes_replicate_a_model_that_fits_with_ddp(gpus: tuple[GpuFacts, ...]) -> None:
    host = HostFacts(cpu_memory_bytes=64 * GiB)
    spread = make_plan(gpus=gpus, host=host, nproc_per_node=4)
    assert (spread.strategy, spread.world_size) == ("ddp", 4)
    assert "DDP over 4" in spread.reasons["strategy"] and "every 4th forward pass" in spread.reasons["strategy"]
    # the global batch is the planned one whatever the process count: N processes share it out
    assert spread.effective_batch_size == make_plan(gpus=gpus, host=host).effective_batch_size


def gpus_of(gib_each: int, count: int) -> tuple[GpuFacts, ...]:
    return tuple(GpuFacts(i, f"{gib_each} GB GPU", gib_each * GiB, (gib_each - 1) * GiB, (9, 0)) for i in range(count))


@pytest.mark.parametrize(
    ("model", "gib_each", "count", "method", "expected"),
    [
        # 8B: 16-bit weights are 16 GB
        (L8B, 24, 1, None, ("qlora", "single")),  # 16-bit + state do not fit 24 GB: 4-bit
        (L8B, 24, 4, None, ("lora", "fsdp2")),  # four shards of 16-bit weights fit where one GPU needs 4-bit
        (L8B, 24, 4, "qlora", ("qlora", "ddp")),  # asked for 4-bit: it fits one GPU, so replicas
        (L8B, 80, 1, None, ("lora", "single")),
        (L8B, 80, 8, None, ("lora", "ddp")),
        (L8B, 141, 4, "qlora", ("qlora", "ddp")),
        # 70B: 16-bit weights are 138 GB, 4-bit about 36 GB
        (L70B, 80, 1, None, ("qlora", "single")),
        (L70B, 80, 4, None, ("lora", "fsdp2")),  # 16-bit sharded four ways beats 4-bit on one
        (L70B, 80, 8, "qlora", ("qlora", "fsdp2")),  # 4-bit + state for rank 256 exceed one 80 GB GPU
        (L70B, 141, 1, None, ("qlora", "single")),
        (L70B, 141, 8, None, ("lora", "fsdp2")),
        (L70B, 141, 8, "qlora", ("qlora", "ddp")),  # 4-bit fits one 141 GB GPU whole
        (L70B, 24, 4, None, ("qlora", "fsdp2")),  # only 4-bit shards fit 24 GB GPUs
        (L70B, 24, 8, "qlora", ("qlora", "fsdp2")),
    ],
)
def test_ddp_when_a_replica_fits_one_gpu_else_fsdp2(
    model: ModelFacts, gib_each: int, count: int, method: str | None, expected: tuple[str, str]
) -> None:
    p = make_plan(model, gpus_of(gib_each, count), nproc_per_node=count, method=method)
    assert (p.method, p.strategy) == expected, p.reasons["strategy"]
    assert p.world_size == count and fits(p)  # the per-GPU estimate within one GPU's budget
    if p.strategy == "fsdp2":
        assert f"FSDP2 over {count} GPUs" in p.reasons["strategy"] and f"1/{count}" in p.reasons["strategy"]


def test_70b_on_one_24gb_gpu_does_not_fit_even_in_4_bit() -> None:
    with pytest.raises(UserError, match="does not fit"):
        make_plan(L70B, gpus_of(24, 1))


def test_fsdp2_shards_cost_less_per_gpu_as_gpus_are_added() -> None:
    per_gpu = [make_plan(L70B, gpus_of(80, n), nproc_per_node=n, method="lora", batch_size=1,
                         gradient_accumulation_steps=1).memory.total_bytes for n in (4, 8)]  # fmt: skip
    assert per_gpu[1] < per_gpu[0]


def test_cpu_processes_share_the_machines_memory() -> None:
    host = HostFacts(cpu_memory_bytes=8 * GiB)
    one, two = make_plan(SMOL, (), host=host), make_plan(SMOL, (), host=host, nproc_per_node=2)
    assert two.memory.budget_bytes is not None and one.memory.budget_bytes is not None
    assert two.memory.budget_bytes == one.memory.budget_bytes // 2
    assert (two.strategy, two.world_size) == ("ddp", 2) and "shared by 2 processes" in two.reasons["method"]
    # an 8B model in fp32 (30 GB) twice, with its passes, does not fit 96 GB; in two shards it does
    sharded = make_plan(L8B, (), host=HostFacts(cpu_memory_bytes=96 * GiB), nproc_per_node=2)
    assert (sharded.method, sharded.strategy) == ("lora", "fsdp2")


def test_shared_dropout_masks_are_a_cpu_measure_the_plan_names() -> None:
    cpu = make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=16 * GiB))
    assert cpu.shared_lora_dropout and "one dropout mask per layer input" in cpu.reasons["shared_lora_dropout"]
    assert not make_plan(SMOL, (H100,)).shared_lora_dropout  # GPUs train with peft's own dropout
    assert not make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=16 * GiB), lora_dropout=0.0).shared_lora_dropout


def test_cpu_checkpointing_is_decided_by_one_pass_not_the_whole_micro_batch() -> None:
    """On CPU a micro-batch runs as passes of at most CPU_TOKENS_PER_PASS tokens: only a pass must fit."""
    roomy = make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=16 * GiB, cpu_bf16=False), use_8bit=True,
                      batch_size=64)  # fmt: skip
    assert not roomy.gradient_checkpointing and roomy.reasons["gradient_checkpointing"].startswith("activations fit")
    tight = make_plan(SMOL, (), host=HostFacts(cpu_memory_bytes=3 * GiB, cpu_bf16=False), use_8bit=True)
    assert tight.gradient_checkpointing and "a pass of" in tight.reasons["gradient_checkpointing"]
    assert fits(tight)


def test_nodes_multiply_the_world_and_shard_over_every_gpu() -> None:
    fixed = {"method": "qlora", "batch_size": 1, "gradient_accumulation_steps": 1}
    one_node = make_plan(L70B, gpus_of(24, 8), nproc_per_node=8, **fixed)
    two_nodes = make_plan(L70B, gpus_of(24, 8), nproc_per_node=8, nnodes=2, **fixed)
    assert (two_nodes.world_size, two_nodes.nnodes, two_nodes.strategy) == (16, 2, "fsdp2")
    assert "FSDP2 over 16 GPUs" in two_nodes.reasons["strategy"]
    assert two_nodes.memory.total_bytes < one_node.memory.total_bytes  # sixteen shards, not eight


def test_cpu_nodes_share_only_their_own_memory() -> None:
    host = HostFacts(cpu_memory_bytes=8 * GiB)
    alone, two_nodes = make_plan(SMOL, (), host=host), make_plan(SMOL, (), host=host, nnodes=2)
    assert two_nodes.world_size == 2 and two_nodes.memory.budget_bytes == alone.memory.budget_bytes
