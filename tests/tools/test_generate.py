"""kd.generate: records in, greedy teacher responses out; batching, sharding and errors."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ACCELERATE, PY, ROOT, free_port
from kd.tools import generate as gen
from kd.tools import generation, prompt_records, shards
from kd.errors import DataError
from kd.integrity import source_identity
from kd.demo.tasks import GENERIC_SYSTEM

EVAL = ROOT / "data/demo/eval.jsonl"


def eval_records(n: int) -> list[dict]:
    with open(EVAL) as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    """(tokenizer, model) of builtin:tiny-teacher, built once into the session's KD_HOME."""
    import torch

    tok, model = generation.load_for_generation("builtin:tiny-teacher", "float32", torch.device("cpu"))
    return tok, model


# --------------------------------------------------------------------------- pure helpers


def test_prompt_messages_per_system_mode():
    rec = {"system": "Solve step by step.", "prompt": "What is 1 + 2?"}
    user = {"role": "user", "content": "What is 1 + 2?"}
    assert prompt_records.prompt_messages(rec, "strategy") == [{"role": "system", "content": "Solve step by step."}, user]
    assert prompt_records.prompt_messages(rec, "generic") == [{"role": "system", "content": GENERIC_SYSTEM}, user]
    assert prompt_records.prompt_messages(rec, "none") == [user]
    assert prompt_records.prompt_messages({"prompt": "What is 1 + 2?"}, "strategy") == [user]  # no instruction to show
    with pytest.raises(ValueError):
        prompt_records.prompt_messages(rec, "teacher")


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (7, 3), (5, 8)])
def test_unshard_inverts_shard(n, world):
    items = list(range(n))
    assert shards.unshard([shards.shard(items, r, world) for r in range(world)], n) == items


def test_unshard_rejects_a_short_shard():
    with pytest.raises(RuntimeError, match="rank 1"):
        shards.unshard([[0, 2], [1]], 4)


def test_read_records_errors_name_file_and_line(tmp_path):
    p = tmp_path / "in.jsonl"
    with pytest.raises(DataError, match="not found"):
        prompt_records.read_prompts(str(tmp_path / "nope.jsonl"))
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=rf"{p}:3: invalid JSON"):
        prompt_records.read_prompts(str(p))
    p.write_text('{"prompt": "a"}\n{"response": "b"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: missing 'prompt'"):
        prompt_records.read_prompts(str(p))
    p.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match="not a string: 'prompt'"):
        prompt_records.read_prompts(str(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="JSON object"):
        prompt_records.read_prompts(str(p))
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        prompt_records.read_prompts(str(p))
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": 5}\n')
    assert [r["prompt"] for r in prompt_records.read_prompts(str(p), limit=2)] == ["a", "b"]  # limit stops before row 3


# --------------------------------------------------------------------------- generation


def test_batched_generation_equals_unbatched(teacher):
    """Left padding must not change greedy outputs: prompts of very different lengths (direct and
    step-by-step instructions, generic and no system) in one batch give what each gives alone."""
    tok, model = teacher
    recs = eval_records(6)
    convs = [prompt_records.prompt_messages(r, mode) for r, mode in zip(recs, ["strategy", "none", "generic"] * 2)]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    lengths = {len(tok(t)["input_ids"]) for t in texts}
    assert len(lengths) > 3 and max(lengths) > 2 * min(lengths)
    side = tok.padding_side
    one = [generation.generate_texts(model, tok, [c], batch_size=1, max_new_tokens=12)[0] for c in convs]
    batched = generation.generate_texts(model, tok, convs, batch_size=4, max_new_tokens=12)
    assert batched == one
    assert tok.padding_side == side  # padding is done by hand, the shared tokenizer is untouched
    assert len(set(one)) > 1  # the outputs depend on the prompt, so an order mix-up would show


def test_generation_stops_at_eos_and_strips_specials(teacher):
    tok, model = teacher
    [text] = generation.generate_texts(model, tok, [prompt_records.prompt_messages(eval_records(1)[0], "strategy")], max_new_tokens=5)
    assert isinstance(text, str) and "<|im_end|>" not in text and "<pad>" not in text and text == text.strip()
    assert generation._stop_ids(model, tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert generation.generate_texts(model, tok, [], max_new_tokens=5) == []


def test_cli_writes_one_record_per_input_in_order(tmp_path, capsys):
    recs = eval_records(5)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"prompt": "beyond the limit"}\n')
    out = tmp_path / "sub" / "out.jsonl"
    gen.main(["--model", "builtin:tiny-teacher", "--input", str(src), "--output", str(out), "--limit", "5",
              "--batch-size", "2", "--max-new-tokens", "6", "--system", "strategy"])
    assert f"wrote 5 records to {out}" in capsys.readouterr().out
    got = read_jsonl(out)
    assert len(got) == 5
    for r, g in zip(recs, got):
        assert list(g) == list(r)  # every field kept, in the input's key order
        assert {k: v for k, v in g.items() if k != "response"} == {k: v for k, v in r.items() if k != "response"}
        assert isinstance(g["response"], str) and g["response"] != r["response"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no shard or temp files left


def test_cli_bad_json_line_is_one_line_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    res = subprocess.run([PY, "-m", "kd.generate", "--model", "builtin:tiny-teacher", "--input", str(src),
                          "--output", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"kd: error: {src}:2: invalid JSON (Expecting value)"]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "content,args,message",
    [
        (None, [], "input file not found"),
        ('{"response": "x"}\n', [], ":1: missing 'prompt'"),
        ('{"prompt": "x"}\n', ["--system", "teacher"], "argument --system: invalid choice"),
        ('{"prompt": "x"}\n', ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, content, args, message):
    src = tmp_path / "in.jsonl"
    if content is not None:
        src.write_text(content)
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", "builtin:tiny-teacher", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd: error: ") and message in err[0]


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path):
    """Strided shards merged by rank 0 give the byte-identical file (7 records: uneven shards)."""
    common = ["--model", "builtin:tiny-teacher", "--input", str(EVAL), "--limit", "7", "--batch-size", "3",
              "--max-new-tokens", "6", "--system", "generic"]
    single, double = tmp_path / "single.jsonl", tmp_path / "double.jsonl"
    gen.main([*common, "--output", str(single)])
    cmd = [ACCELERATE, "launch", "--config_file", "launch/cpu_ddp2.yaml", "--main_process_port", str(free_port()),
           "--num_cpu_threads_per_process", "1", "-m", "kd.generate", *common, "--output", str(double)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "2 process(es)" in res.stderr
    assert double.read_bytes() == single.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double.jsonl", "single.jsonl"]


# --------------------------------------------------------------------------- formats, sampling, resume


def test_every_record_format_gives_the_conversation_to_answer_and_takes_the_answer_back():
    user = {"role": "user", "content": "Hi?"}
    chat = {"messages": [{"role": "system", "content": "S"}, user, {"role": "assistant", "content": "old"},
                         {"role": "user", "content": "And?"}]}
    assert prompt_records.prompt_messages(chat, "strategy") == [{"role": "system", "content": "S"}, *chat["messages"][1:]]
    assert prompt_records.prompt_messages(chat, "none") == chat["messages"][1:]
    out = prompt_records.with_response(chat, "new")
    assert out["messages"][-1] == {"role": "assistant", "content": "new"} and len(out["messages"]) == 5
    answered = {"messages": [user, {"role": "assistant", "content": "old"}]}
    assert prompt_records.prompt_messages(answered, "none") == [user]  # the last assistant turn is answered anew
    assert prompt_records.with_response(answered, "new")["messages"] == [user, {"role": "assistant", "content": "new"}]
    share = {"conversations": [{"from": "human", "value": "Hi?"}], "id": 7}
    assert prompt_records.prompt_messages(share, "generic") == [{"role": "system", "content": GENERIC_SYSTEM}, user]
    assert prompt_records.with_response(share, "x") == {"conversations": [{"from": "human", "value": "Hi?"},
                                                               {"from": "gpt", "value": "x"}], "id": 7}
    assert prompt_records.with_response({"prompt": "Hi?"}, "x") == {"prompt": "Hi?", "response": "x"}
    assert prompt_records._promptable({"messages": [{"role": "assistant", "content": "a"}]}).startswith(
        "message 1 is an assistant turn before any user message")


def test_sampling_is_seeded_and_differs_from_greedy(teacher):
    import torch

    tok, model = teacher
    convs = [prompt_records.prompt_messages(r, "strategy") for r in eval_records(3)]
    hot = generation.Sampling(temperature=1.5, top_p=0.95, n=3, seed=1)
    a = generation.generate_samples(model, tok, convs, batch_size=2, max_new_tokens=8, sampling=hot)
    torch.manual_seed(123)  # the process's own RNG state plays no part
    b = generation.generate_samples(model, tok, convs, batch_size=2, max_new_tokens=8, sampling=hot)
    assert a == b and all(len(s) == 3 for s in a)
    c = generation.generate_samples(model, tok, convs, batch_size=2, max_new_tokens=8,
                             sampling=generation.Sampling(temperature=1.5, top_p=0.95, n=3, seed=2))
    assert c != a
    assert len({t for s in a for t in s}) > 3  # the samples differ from each other
    with pytest.raises(gen.KDError, match="temperature > 0"):
        generation.Sampling(n=2)


def test_cli_on_messages_with_a_chat_template_for_a_base_model(tmp_path, capsys):
    """A base model whose tokenizer has no template: refused in one line, then --chat-template."""
    import shutil

    from kd.models import resolve

    base = tmp_path / "base"
    shutil.copytree(resolve("builtin:tiny-teacher"), base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = tmp_path / "chats.jsonl"
    recs = [{"messages": [{"role": "user", "content": r["prompt"]}], "id": i} for i, r in enumerate(eval_records(3))]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out.jsonl"
    args = ["--model", str(base), "--input", str(src), "--output", str(out), "--max-new-tokens", "4"]
    with pytest.raises(SystemExit):
        gen.main(args)
    assert "--chat-template" in capsys.readouterr().err
    gen.main([*args, "--chat-template", "chatml", "--temperature", "1.0", "--num-samples", "2"])
    got = read_jsonl(out)
    assert [(g["id"], g["sample"]) for g in got] == [(i, j) for i in range(3) for j in range(2)]
    assert all(g["messages"][0] == recs[g["id"]]["messages"][0] and g["messages"][1]["role"] == "assistant"
               for g in got)


def test_an_interrupted_run_resumes_without_duplicating_records(tmp_path, capsys):
    recs = eval_records(5)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out.jsonl"
    args = ["--model", "builtin:tiny-teacher", "--input", str(src), "--output", str(out), "--batch-size", "2",
            "--max-new-tokens", "5"]
    gen.main(args)
    full = read_jsonl(out)
    # what a run killed after two records leaves: its settings, a shard, and a line cut short
    out.unlink()
    settings = {"model": "builtin:tiny-teacher", "input": str(src), "system": "strategy", "max_new_tokens": 5,
                "limit": None, "dtype": "auto", "chat_template": None, "temperature": 0.0, "top_p": 1.0,
                "num_samples": 1, "seed": 0, "input_content": source_identity(str(src))}
    shard = tmp_path / ".out.jsonl.shard-0-of-1.jsonl"
    (tmp_path / ".out.jsonl.settings.json").write_text(json.dumps(settings))
    damaged = shards._shard_line(2, ["damaged"]).replace("damaged", "tampered")  # fails its checksum
    shard.write_text(shards._shard_line(3, ["kept"]) + damaged + shards._shard_line(0, ["kept too"]) + '{"index": 1, "te')
    capsys.readouterr()
    gen.main(args)
    err = capsys.readouterr().err
    assert "1 line(s) of the shard files fail their checksum" in err
    assert "5 records, 2 already done by an interrupted run" in err
    got = read_jsonl(out)
    assert len(got) == 5 and [g["response"] for g in got] == [
        "kept too", full[1]["response"], full[2]["response"], "kept", full[4]["response"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    # other settings: the leftovers are not mixed in
    shard.write_text(shards._shard_line(3, ["stale"]))
    (tmp_path / ".out.jsonl.settings.json").write_text(json.dumps({**settings, "max_new_tokens": 9}))
    gen.main(args)
    assert "starting afresh" in capsys.readouterr().err
    assert read_jsonl(out) == full
    # the same path with other prompts (a same-size edit, its mtime put back): not the old answers
    shard.write_text(shards._shard_line(3, ["stale"]))
    (tmp_path / ".out.jsonl.settings.json").write_text(json.dumps(settings))
    st = src.stat()
    edited = recs[:3] + [{**recs[3], "prompt": recs[3]["prompt"][::-1]}] + recs[4:]
    src.write_text("".join(json.dumps(r) + "\n" for r in edited))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size
    gen.main(args)
    assert "other settings (input_content)" in capsys.readouterr().err
    assert read_jsonl(out)[3]["response"] != "stale"
