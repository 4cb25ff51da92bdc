"""LoRA students (kd/lora.py): only adapters learn, merged export equals the adapted model,
checkpoints hold what trains and resume bitwise, and 2-rank DDP / ZeRO-3 equal one process."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ACCELERATE, ROOT, free_port, run_cli, tiny_overrides
from kd import lora
from kd.config import ConfigError, LoraConfig, load_config
from kd.data import collate, example_from_views, render_views
from kd.forward import Distiller, head, teacher_forward
from kd.loss import LossSpec
from kd.models import load_model, load_tokenizer

DEMO = "configs/demo.yaml"
LORA = {"student.lora.rank": 4, "student.lora.alpha": 8}


@pytest.fixture(scope="module")
def parts():
    tok = load_tokenizer("builtin:tokenizer")
    teacher = load_model("builtin:tiny-teacher", torch.float32, None, "teacher").eval().requires_grad_(False)
    recs = [json.loads(line) for line in open(ROOT / "data/demo/train.jsonl")][:4]
    batch = collate([example_from_views(*render_views(r, tok, erase=True, generic_system=None)) for r in recs],
                    tok.pad_token_id)
    return tok, teacher, batch


def adapted(**kw):
    torch.manual_seed(0)
    student = load_model("builtin:tiny-student", torch.float32, None, "student")
    model = lora.wrap(student, LoraConfig(**{"rank": 4, "alpha": 8.0, **kw}))
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): give the adapters something to say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("implementation", ["chunked", "dense"])
@pytest.mark.parametrize("modules_to_save", [[], ["lm_head"]])
def test_only_adapters_and_named_modules_get_gradients(parts, implementation, modules_to_save):
    tok, teacher, batch = parts
    model = adapted(modules_to_save=modules_to_save)
    spec = LossSpec(len(tok), alpha=0.5, temperature=2.0, implementation=implementation)
    out = Distiller(model, spec)(batch, teacher_forward(teacher, batch), head(teacher))
    out["weighted_sum"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trained
    assert all("lora_" in n or "modules_to_save" in n for n in trained)
    assert any("lm_head.modules_to_save" in n for n in trained) == bool(modules_to_save)
    assert not any("embed_tokens" in n or "base_layer" in n or n.endswith("lm_head.weight") for n in trained)


def test_merged_model_equals_the_adapted_one_and_needs_no_peft(parts, tmp_path):
    tok, _, batch = parts
    model = adapted(modules_to_save=["lm_head"]).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.01)  # the fully trained lm_head drifts from the embedding
        want = model(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"]).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged(model, state)
    merged.save_pretrained(tmp_path / "m")
    assert not hasattr(merged, "peft_config")
    assert not any("lora" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        got = again(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the live model was not touched by the merge
    with torch.no_grad():
        still = model(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"]).logits
    assert torch.equal(still, want)


def test_adapter_on_the_output_layer_and_adapter_export_without_lora_are_refused():
    student = load_model("builtin:tiny-student", torch.float32, None, "student")
    with pytest.raises(ConfigError, match="modules_to_save=\\[lm_head\\]"):
        lora.wrap(student, LoraConfig(rank=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match="train.export=adapter needs a LoRA student"):
        load_config(DEMO, ["train.export=adapter"])
    with pytest.raises(ConfigError, match="student.lora"):
        lora.wrap(load_model("builtin:tiny-student", torch.float32, None, "student"),
                  LoraConfig(rank=2, target_modules=["no_such_proj"]))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_checkpoints_adapters_resumes_bitwise_and_exports(small_data, tmp_path):
    extra = {**LORA, "train.max_steps": 4, "train.save_every": 2, "student.lora.modules_to_save": "[lm_head]"}
    ref = tmp_path / "ref"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, ref, **extra)])
    assert "student: LoRA rank 4, alpha 8 on " in res.stdout and "parameters train" in res.stdout
    ckpt = ref / "checkpoints" / "step_00000004"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all("lora_" in k or "modules_to_save" in k for k in saved)  # adapters only

    # resume: a run directory holding only the step-2 checkpoint continues to the same end, bitwise
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **extra)])
    assert "resumed from" in res.stdout
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(out / "checkpoints/step_00000004/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/loss"] for r in _metrics(out)] == [r["train/loss"] for r in _metrics(ref)[2:]]

    # the merged export loads without peft and equals base student + the checkpoint's adapters
    exported = AutoModelForCausalLM.from_pretrained(ref / "student").eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert not (ref / "student" / "adapter_config.json").exists()
    live = lora.wrap(load_model("builtin:tiny-student", torch.float32, None, "student"),
                     LoraConfig(rank=4, alpha=8.0, modules_to_save=["lm_head"])).eval()
    missing, unexpected = live.load_state_dict({k[len("student."):]: v for k, v in saved.items()}, strict=False)
    assert not unexpected
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, live(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_adapter_export_and_init_from_an_existing_adapter(small_data, tmp_path):
    first = tmp_path / "first"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, first, **LORA, **{"train.max_steps": 2,
                                                                            "train.export": "adapter"})])
    adapter = first / "student"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    # a second run starts from that adapter: its first loss is the first run's last state's, not a fresh one's
    second = tmp_path / "second"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, second, **{
        "student.lora.init_from": str(adapter), "train.max_steps": 1, "train.export": "off"})])
    assert "student: LoRA rank 4, alpha 8" in res.stdout
    fresh = tmp_path / "fresh"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, fresh, **LORA, **{"train.max_steps": 1,
                                                                            "train.export": "off"})])
    assert _metrics(second)[0]["train/loss"] != _metrics(fresh)[0]["train/loss"]
    bad = run_cli(["--config", DEMO, *tiny_overrides(small_data, tmp_path / "bad", **{
        "student.lora.init_from": str(tmp_path / "nowhere")})], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("kd: error: student.lora.init_from=")


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["cpu_ddp2", "cpu_ds2_zero3"])
def test_two_ranks_equal_one_process(launch, small_data, tmp_path):
    extra = {**LORA, "train.max_steps": 3, "train.eval_every": 3}
    ref = tmp_path / "ref"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, ref, **extra, **{"train.micro_batch_size": 8})])
    out = tmp_path / "run"
    cmd = [ACCELERATE, "launch", "--config_file", f"launch/{launch}.yaml", "--main_process_port", str(free_port()),
           "--num_cpu_threads_per_process", "1", "kd/train.py", "--config", DEMO, *tiny_overrides(small_data, out, **extra)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for r, want in zip(_metrics(out), _metrics(ref), strict=True):
        assert r["train/loss"] == pytest.approx(want["train/loss"], rel=1e-6)
        if "eval/ce" in want:
            assert r["eval/ce"] == pytest.approx(want["eval/ce"], rel=1e-6)
    a = load_file(str(ref / "student" / "model.safetensors"))
    b = load_file(str(out / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    if "zero3" in launch:  # the checkpoint's engine files hold no frozen base weights
        engine = out / "checkpoints" / "step_00000003" / "engine"
        model_states = sum(f.stat().st_size for f in engine.rglob("*model_states.pt"))
        assert model_states < sum(v.numel() * v.element_size() for v in a.values()) / 2
