"""Built-in tiny models: resolve(), the cache and the models themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kd.demo import builtin, tasks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both builtin models built once into a private KD_HOME; yields (home, {name: dir})."""
    home = tmp_path_factory.mktemp("kd_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_HOME", str(home))
        yield home, {n: Path(builtin.resolve(f"builtin:{n}")) for n in ("tiny-teacher-init", "tiny-student")}


@pytest.fixture
def home(built, monkeypatch):
    """Point KD_HOME at the module's prebuilt cache for one test."""
    monkeypatch.setenv("KD_HOME", str(built[0]))
    return built[0]


def test_non_builtin_passes_through(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_HOME", str(tmp_path))
    for s in ("gpt2", "meta-llama/Llama-3.2-1B", "/some/local/dir", "./rel", "builtin"):
        assert builtin.resolve(s) == s
    assert not (tmp_path / "builtin").exists()


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError) as e:
        builtin.resolve("builtin:huge-teacher")
    for name in builtin.builtin_names():
        assert name in str(e.value)


def test_builtin_tokenizer_is_shipped_dir():
    from transformers import AutoTokenizer

    path = builtin.resolve("builtin:tokenizer")
    assert Path(path) == builtin.TOKENIZER_DIR and (Path(path) / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"


def test_models_build_into_kd_home(built):
    home, dirs = built
    for name, d in dirs.items():
        assert d == home / "builtin" / name
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        assert (d / "tokenizer.json").read_bytes() == (builtin.TOKENIZER_DIR / "tokenizer.json").read_bytes()
    # No temp or stale directories left behind.
    assert sorted(p.name for p in (home / "builtin").iterdir()) == ["tiny-student", "tiny-teacher-init"]


def test_models_load_with_expected_shapes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, dirs = built
    teacher = AutoModelForCausalLM.from_pretrained(dirs["tiny-teacher-init"])
    student = AutoModelForCausalLM.from_pretrained(dirs["tiny-student"])
    tok = AutoTokenizer.from_pretrained(dirs["tiny-student"])
    n = len(tok)
    assert type(teacher).__name__ == type(student).__name__ == "LlamaForCausalLM"
    assert teacher.get_input_embeddings().weight.shape == (-(-n // 64) * 64, 128)
    assert student.get_input_embeddings().weight.shape == (n, 64)
    assert teacher.config.vocab_size > student.config.vocab_size == n
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (4, 2)
    assert teacher.lm_head.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    for m in (teacher, student):
        assert (m.config.pad_token_id, m.config.bos_token_id, m.config.eos_token_id) == (
            tok.pad_token_id,
            tok.bos_token_id,
            tok.eos_token_id,
        )
        assert m.config.max_position_embeddings == 512 and m.dtype == torch.float32


def test_forward_on_teacher_and_student_views(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, dirs = built
    tok = AutoTokenizer.from_pretrained(dirs["tiny-teacher-init"])
    rec = next(r for r in tasks.generate(8, seed=0) if r["strategy"] == "step_by_step")
    t_ids = tok.apply_chat_template(tasks.messages(rec), tokenize=True, return_dict=False)
    s_ids = tok.apply_chat_template(tasks.messages(rec, erase=True), tokenize=True, return_dict=False)
    for name, ids in (("tiny-teacher-init", t_ids), ("tiny-student", s_ids)):
        model = AutoModelForCausalLM.from_pretrained(dirs[name])
        x = torch.tensor([ids])
        out = model(input_ids=x, labels=x)
        assert out.logits.shape == (1, len(ids), model.config.vocab_size)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        out.loss.backward()


def test_second_call_reuses(home, monkeypatch):
    marker = home / "builtin" / "tiny-student" / builtin._MARKER
    before = marker.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt a complete builtin")

    monkeypatch.setattr(builtin, "_build", boom)
    assert builtin.resolve("builtin:tiny-student") == str(home / "builtin" / "tiny-student")
    assert marker.stat().st_mtime_ns == before


def test_build_is_deterministic_and_keeps_global_rng(built, monkeypatch, tmp_path):
    monkeypatch.setenv("KD_HOME", str(tmp_path))
    state = torch.random.get_rng_state()
    d = Path(builtin.resolve("builtin:tiny-student"))
    assert torch.equal(torch.random.get_rng_state(), state)
    ref = built[1]["tiny-student"]
    assert (d / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_stale_build_is_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_HOME", str(tmp_path))
    d = tmp_path / "builtin" / "tiny-student"
    d.mkdir(parents=True)
    (d / builtin._MARKER).write_text('{"recipe": 0}')  # an old recipe's build
    (d / "junk").write_text("x")
    assert builtin.resolve("builtin:tiny-student") == str(d)
    assert builtin._is_complete(d, "tiny-student") and not (d / "junk").exists()
    assert sorted(p.name for p in d.parent.iterdir()) == ["tiny-student"]


def test_losing_the_race_keeps_the_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_HOME", str(tmp_path))
    real_build = builtin._build
    final = tmp_path / "builtin" / "tiny-student"

    def racing_build(name, out):
        # Another process finishes first, while this one is still building.
        real_build(name, out)
        other = Path(str(final) + ".other")
        real_build(name, other)
        (other / "winner").write_text("1")
        os.rename(other, final)

    monkeypatch.setattr(builtin, "_build", racing_build)
    assert builtin.resolve("builtin:tiny-student") == str(final)
    assert (final / "winner").exists() and builtin._is_complete(final, "tiny-student")
    assert sorted(p.name for p in final.parent.iterdir()) == ["tiny-student"]


def test_tiny_teacher_is_the_shipped_model(monkeypatch, tmp_path):
    """builtin:tiny-teacher is kd/demo/assets/teacher (not copied) when shipped, else the random init."""
    monkeypatch.setenv("KD_HOME", str(tmp_path))
    if builtin.shipped_teacher() is not None:
        assert builtin.resolve("builtin:tiny-teacher") == str(builtin.TEACHER_DIR)
        assert not (tmp_path / "builtin").exists()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(builtin.TEACHER_DIR)
        tok = AutoTokenizer.from_pretrained(builtin.TEACHER_DIR)
        assert tok.get_vocab() == AutoTokenizer.from_pretrained(builtin.TOKENIZER_DIR).get_vocab()
        assert model.config.vocab_size >= len(tok) and model.dtype == torch.float32
        assert sum(p.stat().st_size for p in builtin.TEACHER_DIR.iterdir()) < 16 * 2**20  # a few MB
    monkeypatch.setattr(builtin, "TEACHER_DIR", tmp_path / "absent")
    assert builtin.resolve("builtin:tiny-teacher") == str(tmp_path / "builtin" / "tiny-teacher")
    assert builtin._is_complete(tmp_path / "builtin" / "tiny-teacher", "tiny-teacher")
