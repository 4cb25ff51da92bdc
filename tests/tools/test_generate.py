"""kd.generate: records in, greedy teacher responses out; batching, sharding and errors."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ACCELERATE, PY, ROOT, free_port
from kd.tools import generate as gen
from kd.errors import DataError
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

    tok, model = gen.load_for_generation("builtin:tiny-teacher", "float32", torch.device("cpu"))
    return tok, model


# --------------------------------------------------------------------------- pure helpers


def test_prompt_messages_per_system_mode():
    rec = {"system": "Solve step by step.", "prompt": "What is 1 + 2?"}
    user = {"role": "user", "content": "What is 1 + 2?"}
    assert gen.prompt_messages(rec, "strategy") == [{"role": "system", "content": "Solve step by step."}, user]
    assert gen.prompt_messages(rec, "generic") == [{"role": "system", "content": GENERIC_SYSTEM}, user]
    assert gen.prompt_messages(rec, "none") == [user]
    assert gen.prompt_messages({"prompt": "What is 1 + 2?"}, "strategy") == [user]  # no instruction to show
    with pytest.raises(ValueError):
        gen.prompt_messages(rec, "teacher")


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (7, 3), (5, 8)])
def test_unshard_inverts_shard(n, world):
    items = list(range(n))
    assert gen.unshard([gen.shard(items, r, world) for r in range(world)], n) == items


def test_unshard_rejects_a_short_shard():
    with pytest.raises(RuntimeError, match="rank 1"):
        gen.unshard([[0, 2], [1]], 4)


def test_read_records_errors_name_file_and_line(tmp_path):
    p = tmp_path / "in.jsonl"
    with pytest.raises(DataError, match="not found"):
        gen.read_records(str(tmp_path / "nope.jsonl"))
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=rf"{p}:3: invalid JSON"):
        gen.read_records(str(p))
    p.write_text('{"prompt": "a"}\n{"response": "b"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: missing 'prompt'"):
        gen.read_records(str(p))
    p.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match="not a string: 'prompt'"):
        gen.read_records(str(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="JSON object"):
        gen.read_records(str(p))
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        gen.read_records(str(p))
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": 5}\n')
    assert [r["prompt"] for r in gen.read_records(str(p), limit=2)] == ["a", "b"]  # limit stops before row 3


# --------------------------------------------------------------------------- generation


def test_batched_generation_equals_unbatched(teacher):
    """Left padding must not change greedy outputs: prompts of very different lengths (direct and
    step-by-step instructions, generic and no system) in one batch give what each gives alone."""
    tok, model = teacher
    recs = eval_records(6)
    convs = [gen.prompt_messages(r, mode) for r, mode in zip(recs, ["strategy", "none", "generic"] * 2)]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    lengths = {len(tok(t)["input_ids"]) for t in texts}
    assert len(lengths) > 3 and max(lengths) > 2 * min(lengths)
    side = tok.padding_side
    one = [gen.generate_texts(model, tok, [c], batch_size=1, max_new_tokens=12)[0] for c in convs]
    batched = gen.generate_texts(model, tok, convs, batch_size=4, max_new_tokens=12)
    assert batched == one
    assert tok.padding_side == side  # padding is done by hand, the shared tokenizer is untouched
    assert len(set(one)) > 1  # the outputs depend on the prompt, so an order mix-up would show


def test_generation_stops_at_eos_and_strips_specials(teacher):
    tok, model = teacher
    [text] = gen.generate_texts(model, tok, [gen.prompt_messages(eval_records(1)[0], "strategy")], max_new_tokens=5)
    assert isinstance(text, str) and "<|im_end|>" not in text and "<pad>" not in text and text == text.strip()
    assert gen._stop_ids(model, tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.generate_texts(model, tok, [], max_new_tokens=5) == []


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
