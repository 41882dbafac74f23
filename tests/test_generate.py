"""Generation on tiny checkpoints: greedy decoding is deterministic, equals
step-by-step argmax of full-sequence logits, stops at EOS; sampling and
top-p; streaming text; and ``mlx-moe generate`` end to end."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import cli
from mlx_moe_kernels.generate import (
    eos_token_ids,
    generate,
    generate_tokens,
    load_tokenizer,
    sample,
    stream_generate,
)
from mlx_moe_kernels.models.tiny import WORDS, write_tiny_checkpoint

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    write_tiny_checkpoint(root / "q3", "qwen3_moe", seed=5)
    write_tiny_checkpoint(root / "vl", "qwen3_vl_moe", style="transformers5", sharded=True, seed=6)
    write_tiny_checkpoint(root / "q2", "qwen2_moe", seed=7)
    return {"qwen3_moe": root / "q3", "qwen3_vl_moe": root / "vl", "qwen2_moe": root / "q2"}


def test_tokenizer_round_trip(folders):
    tokenizer = load_tokenizer(folders["qwen3_moe"])
    ids = tokenizer.encode(PROMPT).ids
    assert ids == [WORDS.index(w) for w in PROMPT.split()]
    assert tokenizer.decode(ids) == PROMPT
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(folders["qwen3_moe"] / "nowhere")


def test_eos_token_ids():
    assert eos_token_ids({"eos_token_id": 3}) == [3]
    assert eos_token_ids({"eos_token_id": [3, 4]}) == [3, 4]
    assert eos_token_ids({"text_config": {"eos_token_id": 7}}) == [7]
    assert eos_token_ids({}) == []


def test_eos_from_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 3]}))
    assert eos_token_ids({"eos_token_id": 3}, tmp_path) == [3, 5]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_vl_moe"])
def test_greedy_matches_full_sequence_argmax(folders, arch):
    model, _ = mk.load_model(folders[arch])
    prompt = [2, 3, 4, 5]
    tokens = list(generate_tokens(model, prompt, max_tokens=6))
    assert tokens == list(generate_tokens(model, prompt, max_tokens=6))  # deterministic
    sequence = list(prompt)
    for token in tokens:  # no cache: the whole sequence each step
        logits = model(mx.array([sequence], dtype=mx.uint32))
        assert int(mx.argmax(logits[0, -1]).item()) == token
        sequence.append(token)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_greedy_float32_tokens_equal_the_stock_model(folders, arch):
    """Greedy float32 generation with our kernels everywhere (dense layers,
    attention, RoPE, experts; chunked prompt, pipelined steps) gives the same
    tokens as mlx-lm's model of the same weights on MLX's own ops, and as
    one prompt chunk."""
    from mlx_moe_kernels.cli import _stock_model

    model, config = mk.load_model(folders[arch], dtype="float32")
    prompt = [2, 3, 4, 5, 6, 7, 8]
    ours = list(generate_tokens(model, prompt, max_tokens=12))
    assert list(generate_tokens(model, prompt, max_tokens=12, prefill_chunk=3)) == ours
    stock, description = _stock_model(model, config)
    if stock is None:
        pytest.skip(description)
    assert type(stock).__module__.startswith("mlx_lm.models.")
    assert list(generate_tokens(stock, prompt, max_tokens=12)) == ours


def test_greedy_stops_at_eos(folders):
    model, _ = mk.load_model(folders["qwen2_moe"])
    prompt = [2, 3, 4]
    free = list(generate_tokens(model, prompt, max_tokens=8))
    eos = free[2]
    stopped = list(generate_tokens(model, prompt, max_tokens=8, eos_ids=[eos]))
    assert stopped == free[: free.index(eos) + 1]
    assert len(free) == 8


def test_stream_generate_text_and_stats(folders):
    model, config = mk.load_model(folders["qwen3_moe"])
    tokenizer = load_tokenizer(folders["qwen3_moe"])
    chunks = list(stream_generate(model, tokenizer, PROMPT, max_tokens=5))
    assert len(chunks) == 5 and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == tokenizer.decode([c.token for c in chunks])
    assert chunks[-1].prompt_tokens == 4 and chunks[-1].prompt_tps > 0 and chunks[-1].generation_tps > 0
    result = generate(model, tokenizer, PROMPT, max_tokens=5)
    assert result.tokens == [c.token for c in chunks] and result.text == "".join(c.text for c in chunks)
    # EOS: the stop token ends the stream and adds no text.
    eos = chunks[1].token
    result = generate(model, tokenizer, PROMPT, max_tokens=5, eos_ids=[eos])
    assert result.finish_reason == "stop" and result.tokens[-1] == eos
    assert result.text == tokenizer.decode(result.tokens[:-1])


def test_sampling():
    logits = mx.array([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits).item() == 1
    mx.random.seed(0)
    # A tiny nucleus keeps only the most probable token.
    assert {sample(logits, temp=1.0, top_p=0.01).item() for _ in range(20)} == {1}
    # top_p 0.6 keeps tokens 1 and 3 (0.47 + 0.44 of the mass), never 0 or 2.
    seen = {sample(logits, temp=1.0, top_p=0.6).item() for _ in range(60)}
    assert seen == {1, 3}
    seen = {sample(logits, temp=5.0).item() for _ in range(200)}
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temp=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temp"):
        sample(logits, temp=-1.0)


def test_sampled_generation_is_seeded(folders):
    model, _ = mk.load_model(folders["qwen3_moe"])
    runs = []
    for _ in range(2):
        mx.random.seed(11)
        runs.append(list(generate_tokens(model, [2, 3], max_tokens=6, temp=0.9, top_p=0.9)))
    assert runs[0] == runs[1]


def test_cli_generate(folders, capsys):
    folder = folders["qwen3_moe"]
    status = cli.main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "5"])
    out = capsys.readouterr().out
    assert status == 0
    model, _ = mk.load_model(folder)
    tokenizer = load_tokenizer(folder)
    expected = generate(model, tokenizer, PROMPT, max_tokens=5)
    assert out.startswith(PROMPT + expected.text + "\n")
    assert "ours: prompt 4 tokens" in out and "generation 5 tokens" in out and "tokens/s" in out


def test_cli_generate_huge_pages_same_text(folders, capsys):
    folder = folders["qwen3_moe"]
    assert cli.main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "5"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "5", "--huge-pages"]) == 0
    placed = capsys.readouterr().out
    assert placed.startswith("[huge pages: ")
    assert placed.split("\n", 1)[1].split("\n")[0] == plain.split("\n")[0]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_vl_moe", "qwen2_moe"])
def test_cli_generate_compare(folders, capsys, arch):
    status = cli.main(
        ["generate", "--model", str(folders[arch]), "--prompt", PROMPT, "--max-tokens", "3", "--compare"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert f"mlx_lm.models.{arch}" in out
    assert "stock: prompt 4 tokens" in out
    line = next(l for l in out.splitlines() if l.startswith("max |logit difference|"))
    assert float(line.rsplit(":", 1)[1]) < 1e-4


def test_cli_generate_compare_falls_back_to_reference(folders, tmp_path, capsys):
    # mlx-lm's Qwen2-MoE ignores norm_topk_prob: the stock path is then ours
    # with the reference experts.
    folder = tmp_path / "q2n"
    write_tiny_checkpoint(folder, "qwen2_moe", overrides={"norm_topk_prob": True})
    status = cli.main(
        ["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "2", "--compare",
         "--temp", "0.7", "--top-p", "0.9"]
    )
    out = capsys.readouterr().out
    assert status == 0 and "reference experts" in out
    line = next(l for l in out.splitlines() if l.startswith("max |logit difference|"))
    assert float(line.rsplit(":", 1)[1]) < 1e-4


def test_cli_generate_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert exit_info.value.code == 2
    assert "missing" in capsys.readouterr().err
