"""Training on tiny random models: artifacts, modes, auto-stop on real runs, resume, config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmbox.errors import UserError
from llmbox_engine.train.artifacts import numbered_checkpoints

from conftest import EXAMPLES, run_llmbox, write_json
from train_helpers import adapter_info, qa_file, qa_records, resume, train


def test_a_run_leaves_every_artifact(tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_llama, out, EXAMPLES / "alpaca.json", epochs=2, force_epochs=True, learning_rate=5e-3)
    lora = out / "lora"
    assert {p.name for p in lora.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "adapter_info.json"}
    info = adapter_info(out)
    assert info["base_model"]["model_type"] == "llama" and len(info["base_model"]["fingerprint"]) == 32
    assert info["handler"] == "llama" and info["plan"]["lora_r"] == 8
    assert info["data"]["sources"][0]["records"] == 24 and info["data"]["content_hash"]
    assert info["steps"] == result.steps > 0 and info["stop_reason"] == "all 2 epoch(s) done"
    assert info["best_val_loss"] == min(e for e in [info["best_val_loss"]] if e is not None)
    assert info["tokens_per_s"] > 0 and info["llmbox_version"]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "best" / "adapter_model.safetensors").is_file()
    assert (checkpoints / "last" / "training_state.pt").is_file()
    assert 1 <= len(numbered_checkpoints(checkpoints)) <= 3
    assert (out / "training_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs" / "training").glob("*/events.out.tfevents.*"))
    assert not list(out.glob(".lora*")) and not list(checkpoints.glob(".*"))  # no staging left behind


def test_the_adapter_is_standard_peft_and_changes_the_model(tmp_path: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(tiny_llama, tmp_path, qa_file(tmp_path), epochs=2, force_epochs=True, learning_rate=1e-2)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "lora")
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_loss_falls_on_learnable_data(tmp_path: Path, tiny_llama: Path) -> None:
    result = train(tiny_llama, tmp_path, qa_file(tmp_path, 16), circular=True, max_circular_epochs=12,
                   learning_rate=1e-2, force_epochs=True)  # fmt: skip
    evaluations = json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())["evaluations"]
    assert evaluations[-1]["train_loss"] < 0.7 * evaluations[0]["train_loss"]
    assert result.stop_reason == "cycle limit 12 epoch(s) done"


def test_second_publish_keeps_the_previous_adapter(tmp_path: Path, tiny_llama: Path) -> None:
    data = qa_file(tmp_path)
    train(tiny_llama, tmp_path, data, max_steps=1)
    first = (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    train(tiny_llama, tmp_path, data, max_steps=2, learning_rate=1e-2)
    assert (tmp_path / "lora.prev" / "adapter_model.safetensors").read_bytes() == first
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_bytes() != first


@pytest.mark.parametrize(("mode", "epochs"), [("fast", 1), ("medium", 3), ("slow", 5)])
def test_modes_set_epochs_and_learning_rate(tmp_path: Path, tiny_llama: Path, mode: str, epochs: int) -> None:
    proc = run_llmbox("train", str(tiny_llama), "--data", str(qa_file(tmp_path)), "--mode", mode,
                      "--dry-run", "--json", "--runtime", "local")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    base = 2e-4
    assert plan["epochs"] == epochs
    assert plan["learning_rate"] == pytest.approx(base * {"fast": 2.0, "medium": 1.0, "slow": 0.5}[mode])
    assert not (tiny_llama / "lora").exists()  # a dry run trains nothing


def test_non_stop_mode_runs_until_told_and_adaptive_mode_adapts(tmp_path: Path, tiny_llama: Path) -> None:
    data = qa_file(tmp_path, 40)
    result = train(
        tiny_llama, tmp_path / "ns", data, mode="non-stop", max_steps=7, patience=100, overfitting_threshold=10.0
    )
    assert result.stop_reason == "reached --max-steps 7" and result.steps == 7
    result = train(tiny_llama, tmp_path / "ad", data, mode="adaptive", learning_rate=0.3, force_epochs=True)
    assert result.stop_reason == "all 3 epoch(s) done"
    state = json.loads((tmp_path / "ad" / "checkpoints" / "last" / "trainer_state.json").read_text())
    # a learning rate this high makes the loss rise: adaptive mode must have turned it down
    assert state["adaptive"]["lr_scale"] < 1.0


def test_circular_mode_grows_the_batch_and_stops_at_perfect_loss(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmbox_engine.train.recipe import LoraRecipe

    checks: list[int] = []
    real = LoraRecipe.loss_on

    def counted(self: LoraRecipe, examples: Any) -> float:
        checks.append(len(examples))
        return real(self, examples)

    monkeypatch.setattr(LoraRecipe, "loss_on", counted)
    data = write_json(tmp_path / "two.json", qa_records(2))
    result = train(tiny_llama, tmp_path, data, circular=True, max_circular_epochs=200, learning_rate=1e-2, lora_r=16)
    assert result.stop_reason.startswith("perfect loss"), result.stop_reason
    info = adapter_info(tmp_path)
    assert info["plan"]["circular"] and info["plan"]["n_val"] == 0
    assert result.steps < 200
    passes = len(json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())["evaluations"])
    # the perfect-loss check (a forward over the training set) ran, but only once passes came near the threshold
    assert 0 < len(checks) < passes, (checks, passes)


def test_circular_batch_grows_between_cycles(tmp_path: Path, tiny_llama: Path) -> None:
    train(tiny_llama, tmp_path, qa_file(tmp_path, 32), circular=True, max_circular_epochs=4, batch_size=2,
          gradient_accumulation_steps=1, force_epochs=True)  # fmt: skip
    state = json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["batch_size"] == 16  # 2 -> 4 -> 8 -> 16 over four cycles
    # steps per cycle: 16, 8, 4, 2
    assert state["step"] == 30


def test_patience_stops_a_run_that_does_not_improve(tmp_path: Path, tiny_llama: Path) -> None:
    result = train(tiny_llama, tmp_path, qa_file(tmp_path, 40), learning_rate=1e-12, epochs=20)
    assert result.stop_reason.startswith("no improvement in 3 evaluations"), result.stop_reason


def test_force_epochs_turns_auto_stop_off(tmp_path: Path, tiny_llama: Path) -> None:
    result = train(tiny_llama, tmp_path, qa_file(tmp_path, 40), learning_rate=1e-12, epochs=3, force_epochs=True)
    assert result.stop_reason == "all 3 epoch(s) done"
    assert adapter_info(tmp_path)["plan"]["auto_stop"] is False


def test_overfitting_stops_a_real_run(tmp_path: Path, tiny_llama: Path) -> None:
    # train and validation answers share nothing: memorising the training answers makes validation worse
    records = qa_records(60, seed=1)
    result = train(tiny_llama, tmp_path, write_json(tmp_path / "qa.json", records), learning_rate=5e-2, lora_r=32,
                   epochs=60, validation_split=0.2, overfitting_threshold=0.05, patience=50)  # fmt: skip
    assert result.stop_reason.startswith("overfitting"), result.stop_reason
    info = adapter_info(tmp_path)
    assert info["published_step"] == info["best_step"] < info["steps"]  # the best checkpoint was kept


def test_perplexity_explosion_stops_a_text_run(tmp_path: Path, tiny_llama: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line number {i} says the sky is blue and the grass is green" for i in range(40)))
    result = train(tiny_llama, tmp_path, text, learning_rate=50.0, epochs=10, patience=50)
    assert result.stop_reason.startswith(("perplexity", "diverged")), result.stop_reason


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path: Path, tiny_llama: Path) -> None:
    data = qa_file(tmp_path, 40)
    flags = {
        "epochs": 2,
        "force_epochs": True,
        "learning_rate": 1e-2,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
    }
    whole = train(tiny_llama, tmp_path / "whole", data, **flags)
    part = train(tiny_llama, tmp_path / "parts", data, **flags, max_steps=4)
    assert part.steps == 4
    resumed = resume(tiny_llama, tmp_path / "parts", data, **flags)
    assert resumed.steps == whole.steps
    a, b = adapter_info(tmp_path / "whole"), adapter_info(tmp_path / "parts")
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-4)
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-3)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path, tiny_llama: Path) -> None:
    from llmbox.plan import PlanFlags
    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    with pytest.raises(UserError, match="no checkpoint to resume from"):
        LoraRecipe(TrainOptions(tiny_llama, tmp_path, str(qa_file(tmp_path)), PlanFlags(), resume=True)).run()


def test_out_of_memory_retries_the_same_step_in_smaller_passes_and_continues_where_it_was(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmbox_engine.train.recipe import LoraRecipe

    data = qa_file(tmp_path, 40)
    flags = {"batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 4, "learning_rate": 1e-2}
    train(tiny_llama, tmp_path / "whole", data, **flags)
    real = LoraRecipe._accumulate
    calls = {"n": 0}

    def flaky(self: LoraRecipe, batches: list[dict[str, torch.Tensor]], targets: int) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(self, batches, targets)

    monkeypatch.setattr(LoraRecipe, "_accumulate", flaky)
    result = train(tiny_llama, tmp_path / "retried", data, **flags)
    assert result.steps == 4
    whole, retried = adapter_info(tmp_path / "whole"), adapter_info(tmp_path / "retried")
    assert retried["plan"]["max_forward_tokens"] == whole["plan"]["max_forward_tokens"] // 2
    assert (retried["plan"]["batch_size"], retried["plan"]["gradient_accumulation_steps"]) == (8, 1)
    # the same examples in the same order, none twice: the run ends where the uninterrupted one did
    seen = [json.loads((tmp_path / run / "checkpoints" / "last" / "trainer_state.json").read_text())["tokens_seen"]
            for run in ("whole", "retried")]  # fmt: skip
    assert seen[0] == seen[1]
    assert retried["final_val_loss"] == pytest.approx(whole["final_val_loss"], rel=1e-3)


def test_config_file_sets_options_and_the_command_line_wins(tmp_path: Path, tiny_llama: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("lora-r: 4\nlora_alpha: 7\nmode: fast\n")
    proc = run_llmbox("train", str(tiny_llama), "--config", str(config), "--lora-r", "2", "--data",
                      str(qa_file(tmp_path)), "--dry-run", "--json", "--runtime", "local")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["lora_r"], plan["lora_alpha"], plan["mode"]) == (2, 7, "fast")
    config.write_text("no-such-option: 1\n")
    proc = run_llmbox("train", str(tiny_llama), "--config", str(config), "--data", "x", "--runtime", "local")
    assert proc.returncode != 0 and "unknown option 'no-such-option'" in proc.stderr


@pytest.mark.parametrize(("flag", "named"), [(("--optimizer", "adamw_bnb_8bit"), "--optimizer adamw_bnb_8bit"),
                                             (("--method", "qlora"), "QLoRA (4-bit weights)")])  # fmt: skip
def test_quantized_training_without_bitsandbytes_is_a_clear_error(
    tmp_path: Path, tiny_llama: Path, flag: tuple[str, str], named: str
) -> None:
    hidden = tmp_path / "no-bitsandbytes"  # a sitecustomize that makes bitsandbytes look uninstalled
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text('import sys\nsys.modules["bitsandbytes"] = None\n')
    proc = run_llmbox(
        "train",
        str(tiny_llama),
        "--data",
        str(qa_file(tmp_path)),
        *flag,
        "--runtime",
        "local",
        "--no-tensorboard",
        "--output",
        str(tmp_path / "run"),
        env={"PYTHONPATH": str(hidden)},
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: {named} needs bitsandbytes, which is not installed here" in proc.stderr, proc.stderr


def test_train_rejects_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    proc = run_llmbox("train", str(tmp_path), "--data", str(qa_file(tmp_path)), "--runtime", "local")
    assert proc.returncode != 0 and "not a model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_train_lora_script_for_pipelines(tmp_path: Path, tiny_llama: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "engine" / "train_lora.py"
    base = [sys.executable, str(script), "--model-path", str(tiny_llama), "--no-tensorboard", "--skip-test"]
    ok = subprocess.run([*base, "--data", str(qa_file(tmp_path)), "--output", str(tmp_path / "run"), "--max-steps", "2",
                         "--lora-r", "4"], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert adapter_info(tmp_path / "run")["plan"]["lora_r"] == 4
    bad = subprocess.run([*base, "--data", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_failed_write_leaves_the_published_folder_untouched(tmp_path: Path) -> None:
    from llmbox_engine.atomic import staged_dir

    final = tmp_path / "lora"
    with staged_dir(final) as staging:
        (staging / "adapter_model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "adapter_model.safetensors").write_text("half of v2")
        raise RuntimeError("disk full")
    assert (final / "adapter_model.safetensors").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # no staging folder left behind
    # readable by a server running as another user, like any folder the user makes
    assert final.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert (final / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_packed_and_padded_batches_give_the_trainer_the_same_loss(tmp_path: Path, tiny_llama: Path) -> None:
    # the trainer packs with flash-attention (GPU) or, on CPU, with SDPA run per packed example
    from llmbox.plan import PlanFlags
    from llmbox_engine.data.batching import packed_batch, padded_batch
    from llmbox_engine.train.loss import loss_sum
    from llmbox_engine.train.model_setup import attention_implementation
    from llmbox_engine.train.packed_attention import PACKED_SDPA
    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    assert attention_implementation("cpu", True) == PACKED_SDPA
    assert attention_implementation("cpu", True, vision=True) == "sdpa"  # image batches stay padded
    assert attention_implementation("cpu", False) == "sdpa" and attention_implementation("cuda", False) == "sdpa"
    recipe = LoraRecipe(
        # fp32: the comparison is exact to 1e-4 (bf16-mixed, the CPU default where it has native bf16, is not)
        TrainOptions(
            tiny_llama, tmp_path, str(qa_file(tmp_path)), PlanFlags(max_steps=1, precision="fp32"), tensorboard=False
        )
    )
    recipe.setup()
    assert recipe.packed is True
    examples = recipe.train_set[:5]
    recipe.model.eval()
    with torch.no_grad():
        padded, n_padded = loss_sum(recipe.model, padded_batch(examples, recipe.tokenizer.pad_token_id, 8))
        packed, n_packed = loss_sum(recipe.model, packed_batch(examples))
    assert n_padded == n_packed > 0
    assert float(packed) == pytest.approx(float(padded), rel=1e-4)


def test_bf16_mixed_multiplies_in_bf16_over_fp32_weights_and_learns(tmp_path: Path, tiny_llama: Path) -> None:
    from llmbox.plan import PlanFlags
    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    flags = PlanFlags(precision="bf16-mixed", circular=True, max_circular_epochs=12, learning_rate=1e-2,
                      force_epochs=True)  # fmt: skip
    data = str(qa_file(tmp_path, 16))
    recipe = LoraRecipe(TrainOptions(tiny_llama, tmp_path, data, flags, tensorboard=False, skip_test=True))
    recipe.setup()
    base = recipe.model.get_base_model()
    assert {t.dtype for t in recipe.model.parameters() if t.requires_grad} == {torch.float32}  # LoRA and Adam: fp32
    assert base.model.embed_tokens.weight.dtype == torch.float32  # the residual stream stays fp32
    # frozen projections and the head are stored as the bf16 that autocast would cast them to at every matmul
    assert base.model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    q_proj = recipe.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    hook = q_proj.register_forward_hook(lambda _module, _args, output: seen.append(output.dtype))
    with recipe.stop:
        result = recipe.finish(recipe.train())
    trained = len(seen)
    assert result.adapter is not None and recipe.sample_answers(result.adapter)  # generation runs under autocast too
    hook.remove()
    assert 0 < trained < len(seen) and set(seen) == {torch.bfloat16}  # every forward multiplied in bf16
    evaluations = json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())["evaluations"]
    assert evaluations[-1]["train_loss"] < 0.7 * evaluations[0]["train_loss"]
    assert adapter_info(tmp_path)["plan"]["precision"] == "bf16-mixed"


def test_out_of_memory_in_one_of_several_processes_stops_with_a_clear_error(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank cannot retry alone (the others wait in collectives it would not match): it stops, naming itself."""
    from llmbox.plan import PlanFlags
    from llmbox_engine.train.distributed import DistributedContext
    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    recipe = LoraRecipe(TrainOptions(tiny_llama, tmp_path, str(qa_file(tmp_path)), PlanFlags(max_steps=2),
                                     tensorboard=False, skip_test=True))  # fmt: skip
    recipe.setup()
    recipe.dist = DistributedContext(rank=1, world_size=2)  # as torchrun's rank 1 sees itself

    def out_of_memory(group: list[list[int]]) -> float:
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(recipe, "_optimizer_step", out_of_memory)
    with pytest.raises(UserError, match=r"rank 1: out of memory on CPU RAM .* --strategy fsdp2"):
        recipe._step_with_retry([[0]])
