"""Text generation with our models: KV cache, greedy or temperature/top-p
sampling, EOS stopping, streaming, and prompt/generation speed.

* :func:`generate_tokens`: the token loop (a generator of token ids);
* :func:`stream_generate`: text pieces as they are produced, each a
  :class:`GenerationChunk` carrying the running statistics;
* :func:`generate`: the whole completion as a :class:`GenerationResult`;
* :func:`load_tokenizer`: the folder's ``tokenizer.json`` (``tokenizers``).
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels.models.base import make_cache

__all__ = [
    "GenerationChunk",
    "GenerationResult",
    "eos_token_ids",
    "load_tokenizer",
    "sample",
    "generate_tokens",
    "stream_generate",
    "generate",
]


def load_tokenizer(path: Union[str, Path]):
    """The ``tokenizers.Tokenizer`` in ``path/tokenizer.json`` (or ``path``
    itself if it is the file). Raises FileNotFoundError if it is missing,
    ValueError if unreadable, ImportError without ``tokenizers``."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir() or file.suffix != ".json":
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {file}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:
        raise ValueError(f"cannot read tokenizer {file}: {error}") from error


def eos_token_ids(config: Dict[str, Any], folder: Optional[Union[str, Path]] = None) -> List[int]:
    """The end-of-sequence ids of a checkpoint: ``eos_token_id`` (int or
    list) of ``config``, else of its ``text_config``, plus, if ``folder``
    has a ``generation_config.json``, the ids listed there (as the Hub's
    Qwen3-VL checkpoints keep them). Order kept, duplicates dropped."""
    values: List[Any] = [config.get("eos_token_id")]
    if values[0] is None and isinstance(config.get("text_config"), dict):
        values[0] = config["text_config"].get("eos_token_id")
    if folder is not None:
        generation_config = Path(folder) / "generation_config.json"
        if generation_config.is_file():
            try:
                values.append(json.loads(generation_config.read_text()).get("eos_token_id"))
            except (OSError, ValueError, AttributeError) as error:
                raise ValueError(f"cannot read {generation_config}: {error}") from error
    ids: List[int] = []
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else ([] if value is None else [value]):
            if int(item) not in ids:
                ids.append(int(item))
    return ids


def sample(logits: mx.array, temp: float = 0.0, top_p: float = 1.0) -> mx.array:
    """The next token ids ``[B]`` from logits ``[B, vocab]``.

    ``temp == 0``: greedy (argmax). Otherwise sample from
    ``softmax(logits / temp)`` restricted, when ``top_p < 1``, to the
    smallest set of most probable tokens whose probability reaches
    ``top_p`` (nucleus sampling; the most probable token is always kept).
    Uses MLX's global random state (``mx.random.seed``). Raises
    ValueError for ``temp < 0`` or ``top_p`` outside ``(0, 1]``."""
    if temp < 0:
        raise ValueError(f"temp must be >= 0 (got {temp})")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temp
    if top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # Probability mass strictly before each sorted token: keep it while
        # that mass is below top_p (so the first token is always kept).
        before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, -float("inf"))
    return mx.random.categorical(logits, axis=-1)


# Prompt positions run through the model per forward pass: bounds the
# activations a long prompt needs (a [chunk, vocab] logit block is never
# made: only the last position's logits are computed).
PREFILL_CHUNK = 512


def _takes_last_only(model: nn.Module) -> bool:
    """Whether ``model(tokens, cache, last_only=True)`` is accepted (our
    models; mlx-lm's take no such argument)."""
    try:
        return "last_only" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return False


def _cache_arrays(cache: list) -> List[mx.array]:
    """The key/value arrays of a list of caches (what a prompt chunk must
    compute; mlx-lm's caches expose ``state``, ours ``keys``/``values``)."""
    arrays: List[mx.array] = []
    for c in cache:
        for name in ("keys", "values"):
            value = getattr(c, name, None)
            if isinstance(value, mx.array):
                arrays.append(value)
    return arrays


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    max_tokens: int = 128,
    temp: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    cache: Optional[list] = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield generated token ids one by one (batch of one).

    The prompt fills a fresh KV cache (or ``cache``) in chunks of
    ``prefill_chunk`` positions, computing logits for its last position
    only; each step then feeds only the last token. The next step's graph
    is built and its evaluation started (``mx.async_eval``) before the
    current token is read back, so the host never waits between steps; the
    token stays on the device until it is yielded. Stops after
    ``max_tokens`` tokens or after yielding a token in ``eos_ids`` (the EOS
    token is yielded, so callers can see why it stopped). Because of that
    pipelining, a caller-supplied ``cache`` may hold one position more than
    the tokens yielded when the loop stops early."""
    if len(prompt) == 0:
        raise ValueError("the prompt must have at least one token")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
    cache = make_cache(model) if cache is None else cache
    last_only = {"last_only": True} if _takes_last_only(model) else {}
    eos = set(int(e) for e in eos_ids)

    def next_token(inputs: mx.array) -> mx.array:
        logits = model(inputs, cache=cache, **last_only)[:, -1, :]
        return sample(logits, temp, top_p)

    ids = list(prompt)
    while len(ids) > prefill_chunk:
        # Every chunk but the last only fills the cache: evaluating the
        # cache arrays skips the chunk's logits entirely.
        chunk = mx.array([ids[:prefill_chunk]], dtype=mx.uint32)
        model(chunk, cache=cache, **last_only)
        mx.eval(_cache_arrays(cache))
        ids = ids[prefill_chunk:]
    if max_tokens <= 0:
        return
    token = next_token(mx.array([ids], dtype=mx.uint32))
    mx.async_eval(token)
    for n in range(max_tokens):
        following = None
        if n + 1 < max_tokens:
            following = next_token(token.reshape(1, 1).astype(mx.uint32))
            mx.async_eval(following)
        value = int(token.item())
        yield value
        if value in eos:
            return
        token = following


@dataclass
class GenerationChunk:
    """One streamed piece: ``text`` (may be empty while a multi-byte
    character is incomplete), the ``token`` it came from, and the running
    statistics (``prompt_tps`` is known from the first chunk on)."""

    text: str
    token: int
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" on the last chunk


@dataclass
class GenerationResult:
    """A finished generation: the text, its token ids, the counts and
    speeds (tokens per second), and why it ended ("stop" or "length")."""

    text: str
    tokens: List[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    max_tokens: int = 128,
    temp: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
) -> Iterator[GenerationChunk]:
    """Generate from ``prompt`` (text, encoded with ``tokenizer``, or token
    ids) and yield the new text piece by piece as :class:`GenerationChunk`.

    The EOS token ends the stream and adds no text. Prompt speed is the
    prompt length over the time to the first token; generation speed counts
    the tokens after the first over the time since it.
    """
    ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
    eos = set(int(e) for e in eos_ids)
    tokens: List[int] = []
    text = ""
    start = time.perf_counter()
    first_at = None
    prompt_tps = 0.0
    for count, token in enumerate(
        generate_tokens(model, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, eos_ids=eos), 1
    ):
        now = time.perf_counter()
        if first_at is None:
            first_at = now
            prompt_tps = len(ids) / max(now - start, 1e-9)
        gen_tps = (count - 1) / (now - first_at) if count > 1 else 0.0
        finish = "stop" if token in eos else ("length" if count == max_tokens else None)
        if token not in eos:
            tokens.append(token)
        full = tokenizer.decode(tokens)
        piece = ""
        # Hold back an incomplete multi-byte character until it completes
        # (or the generation ends).
        if finish is not None or not full.endswith("\ufffd"):
            piece, text = full[len(text) :], full
        yield GenerationChunk(piece, token, len(ids), count, prompt_tps, gen_tps, finish)


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    **kwargs,
) -> GenerationResult:
    """The whole completion of ``prompt`` (see :func:`stream_generate` for
    the arguments) as a :class:`GenerationResult`."""
    pieces: List[str] = []
    tokens: List[int] = []
    last = None
    for chunk in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(chunk.text)
        tokens.append(chunk.token)
        last = chunk
    if last is None:
        return GenerationResult("", [], 0, 0.0, 0.0, "length")
    return GenerationResult(
        "".join(pieces), tokens, last.prompt_tokens, last.prompt_tps, last.generation_tps,
        last.finish_reason or "length",
    )
