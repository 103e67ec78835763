"""Generation: greedy or sampled decoding with a paged KV cache.

The KV cache lives in one :class:`apt_hal.paged_store.PagedTensor` store; each forward
pass writes its keys and values with ``apt_hal.ops.paged_write`` (by slot mapping) and a decode
step reads a sequence's past with ``apt_hal.ops.paged_gather`` (by block table). Prompts of
different lengths run as one batch: each sequence owns its blocks, so no sequence is padded
inside the cache.

Decode steps have fixed shapes (one token per sequence; the block table and the gathered past
span each sequence's whole capacity, the mask hides what is not written yet), so from the second
step on they replay as one device graph (:class:`apt_hal.graphs.StepGraph`) where the device has
graph capture; ``GenerationConfig(graphs=False)`` runs them eagerly. A decoder-only model keeps
its last KV cache and captured decode graph between calls (:class:`DecodeSession`): the next call
with the same batch size, whose sequences fit that cache, replays the graph from its first decode
step. :func:`release_decode_session` frees them.

Sampling follows Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a draw
from the distribution (``torch.multinomial``, seeded by ``seed``), or the argmax with ``greedy``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import threading
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import apt_hal.graphs
from apt_hal.models.config import ModelConfig
from apt_hal.models.layers import KVStep
from apt_hal.models.streaming import is_streamed
from apt_hal.paged_store import PagedTensor


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to choose each new token. ``stop_tokens``: generation of a sequence ends when it
    produces one (the stop token is not returned). ``seed``: the same seed gives the same samples."""

    max_new_tokens: int = 32
    temperature: float = 1.0  # > 0; logits are divided by it (greedy ignores it)
    top_k: int = 0  # 0: no limit; else sample among the k most likely tokens
    top_p: float = 1.0  # nucleus: the fewest most likely tokens holding at least this probability
    repetition_penalty: float = 1.0  # > 0; 1 is none; a seen token's logit l becomes l/r if l > 0 else l*r
    stop_tokens: Sequence[int] = ()
    seed: Optional[int] = None
    greedy: bool = False
    graphs: bool = True  # replay decode steps as a device graph where the device has one (apt_hal.graphs)
    # torch.compile the decode step's forward (fixed shapes), which fuses the norms and elementwise
    # ops between the HAL's kernels; the first generate call per shape pays the compilation.
    compile: bool = False

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"GenerationConfig: temperature must be > 0, got {self.temperature!r} "
                             "(for the most likely token every step, use greedy=True)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"GenerationConfig: top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig: top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"GenerationConfig: repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        try:
            stops = tuple(operator.index(t) for t in self.stop_tokens)
        except TypeError:
            raise ValueError(f"GenerationConfig: stop_tokens must be token ids (ints), "
                             f"got {self.stop_tokens!r}") from None
        object.__setattr__(self, "stop_tokens", stops)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"GenerationConfig: seed must be an int or None, got {self.seed!r}")


class PagedKVCache:
    """The KV cache of a batch of sequences, in one PagedTensor store on the model's device.

    A block holds ``block_size`` tokens of every layer: block shape ``(n_layers, block_size, 2,
    kv_heads, head_dim)``, so layer ``i``'s cache is the pool view ``pool[:, i]`` and a token's
    keys and values are one item. Sequence ``b`` gets the blocks for ``capacities[b]`` tokens up
    front, pinned, so its slots never move.
    """

    def __init__(self, config: ModelConfig, capacities: Sequence[int], *, device: torch.device,
                 dtype: torch.dtype, block_size: int = 16):
        counts = [math.ceil(c / block_size) for c in capacities]
        self.block_size = block_size
        self.store = PagedTensor((config.n_layers, block_size, 2, config.n_kv_heads, config.head_dim), dtype,
                                 device, num_device_blocks=sum(counts))
        self._ids = self.store.allocate(sum(counts))
        self.store.pin(self._ids)
        slots = self.store.device_slots(self._ids).tolist()
        table, start = [], 0
        for n in counts:
            table.append(slots[start:start + n] + [-1] * (max(counts) - n))
            start += n
        self.block_table = torch.tensor(table, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(len(counts), dtype=torch.int64, device=device)
        self._fresh = True

    def step(self, positions: torch.Tensor, valid: Optional[torch.Tensor] = None) -> KVStep:
        """The cache access of one forward pass over tokens at ``positions [B, S]``; tokens whose
        ``valid`` is False (padding) are not written. Positions must be below each capacity."""
        bs = self.block_size
        slots = self.block_table.gather(1, positions // bs) * bs + positions % bs
        reach = positions + 1
        if valid is not None:
            slots = slots.masked_fill(~valid, -1)
            reach = reach.masked_fill(~valid, 0)
        # In place: a decode step replayed as a device graph reads and advances this same tensor.
        self.lengths.copy_(torch.maximum(self.lengths, reach.amax(1)))
        fresh, self._fresh = self._fresh, False
        return KVStep(self.store.pool, slots.reshape(-1), self.block_table, positions, self.lengths, fresh)

    def reset(self) -> None:
        """Forget every cached token, in place: a captured decode step keeps reading these tensors."""
        self.lengths.zero_()
        self._fresh = True

    def close(self) -> None:
        """Give the blocks back and release the store."""
        self.store.unpin(self._ids)
        self.store.free(self._ids)
        self.store.close()


# A kept session's capacity per sequence is rounded up to a multiple of this many tokens, so calls
# whose prompts or max_new_tokens differ a little share one cache and its captured graph.
KEPT_CAPACITY_STEP = 64


class DecodeSession:
    """A batch's KV cache and its decode step (a :class:`apt_hal.graphs.StepGraph`).

    Why a model keeps one between ``generate`` calls: the first decode step of a call runs eagerly
    and the second is captured; for a 1B model on an H100 the two cost tens of milliseconds of
    host time, more than 64 replayed steps take on the device. A kept session replays from the
    first decode step of the next call.

    Why reuse is safe: a captured graph reads the cache's tensors and the model's weights by
    address, so a session is reused only under the same :attr:`key`: batch size, dtype, device,
    the ``graphs`` and ``compile`` settings, train/eval mode and the address, dtype and shape of
    every parameter and buffer (a weight replaced or moved starts a new session; weights changed
    in place, as an optimiser or ``load_state_dict`` does, are read anew by the replay). Its
    :attr:`capacity` (tokens per sequence, a multiple of ``KEPT_CAPACITY_STEP``) must hold the
    call's longest sequence and be at most twice what the call needs: a decode step attends over
    the whole (masked) capacity.
    Only decoder-only models that do not stream their weights keep one (a seq2seq step also reads
    its call's encoder output; streamed weights move between steps). A session in use by one call
    is not shared with another (a concurrent call builds its own).
    """

    def __init__(self, key: Optional[tuple], cache: PagedKVCache, graphs: bool, capacity: int):
        self.key, self.cache, self.capacity = key, cache, capacity
        self.step = apt_hal.graphs.StepGraph(None, enabled=graphs)
        self.in_use = False

    def close(self) -> None:
        self.step = None
        self.cache.close()


# model -> its kept decode session (weak: the session never keeps the model alive; its step's
# function, which calls the model, is dropped when each generate call ends).
_KEPT_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, DecodeSession]" = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()  # two threads never take the same free session


def release_decode_session(model: nn.Module) -> bool:
    """Free the KV cache and decode graph that ``model`` kept from its last ``generate`` call
    (device memory: the cache and the graph's pool). Returns whether there was one."""
    session = _KEPT_SESSIONS.pop(model, None)
    if session is None:
        return False
    if not session.in_use:
        session.close()
    return True


def _weights_key(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))


def _open_session(model: nn.Module, config: GenerationConfig, capacities: list[int], device: torch.device,
                  dtype: torch.dtype, graphs: bool) -> tuple[DecodeSession, bool]:
    """(session, kept): the model's kept session when its key matches and it is free, else a new
    one, kept (replacing the old) where the model may keep one; marked in use. A session that is
    not kept is closed by the caller."""
    with _SESSIONS_LOCK:
        session, kept = _choose_session(model, config, capacities, device, dtype, graphs)
        session.in_use = True
    return session, kept


def _choose_session(model: nn.Module, config: GenerationConfig, capacities: list[int], device: torch.device,
                    dtype: torch.dtype, graphs: bool) -> tuple[DecodeSession, bool]:
    cfg = model.config
    kept = _KEPT_SESSIONS.get(model)
    # seq2seq and streamed models keep none; a kept session in use by another call is not shared.
    if cfg.family == "seq2seq" or is_streamed(model) or (kept is not None and kept.in_use):
        return DecodeSession(None, PagedKVCache(cfg, capacities, device=device, dtype=dtype), graphs, 0), False
    capacity = math.ceil(max(capacities) / KEPT_CAPACITY_STEP) * KEPT_CAPACITY_STEP
    key = (len(capacities), dtype, device, graphs, config.compile, model.training, _weights_key(model))
    if kept is not None and kept.key == key and capacity <= kept.capacity <= 2 * capacity:
        kept.cache.reset()
        return kept, True
    if kept is not None:
        release_decode_session(model)  # before allocating its successor
    cache = PagedKVCache(cfg, [capacity] * len(capacities), device=device, dtype=dtype)
    session = DecodeSession(key, cache, graphs, capacity)
    _KEPT_SESSIONS[model] = session
    return session, True


# model -> its forward compiled for decode steps (one compilation per model and shape, not per call).
_COMPILED_FORWARD: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def compiled_forward(model: nn.Module) -> Callable:
    """``model``'s forward under ``torch.compile(fullgraph=True, dynamic=False)``, called like
    ``model``. The compiled function is cached per model; it is the unbound ``forward``, so the
    cache does not keep the model alive."""
    fn = _COMPILED_FORWARD.get(model)
    if fn is None:
        fn = _COMPILED_FORWARD[model] = torch.compile(type(model).forward, fullgraph=True, dynamic=False)
    return functools.partial(fn, model)


def sampling_probs(logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The distribution a token is drawn from: ``logits [B, V]`` after the repetition penalty on
    ``seen [B, V]`` (bool) tokens, divided by the temperature, restricted to the top-k and then the
    top-p (nucleus) tokens; float32 probabilities ``[B, V]``."""
    scores = penalize_repetition(logits.float(), seen, config.repetition_penalty) / config.temperature
    if config.top_k and config.top_k < scores.shape[-1]:
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(config.top_k, dim=-1).indices, True)
        scores = scores.masked_fill(~kept, float("-inf"))
    if config.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Keep a token while the tokens more likely than it hold less than top_p (so the first is always kept).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


def choose_tokens(logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token ``[B]`` of each row of ``logits [B, V]``: the most likely after the repetition
    penalty (greedy), or drawn from :func:`sampling_probs`."""
    if config.greedy:
        return penalize_repetition(logits.float(), seen, config.repetition_penalty).argmax(-1)
    return torch.multinomial(sampling_probs(logits, seen, config), 1, generator=generator).squeeze(1)


def record_tokens(tokens: torch.Tensor, new: list[list[int]], done: list[bool], config: GenerationConfig) -> bool:
    """Append each unfinished row's token to ``new``; a stop token (not appended) or reaching
    ``max_new_tokens`` finishes the row. Returns whether every row is finished."""
    for b, t in enumerate(tokens.tolist()):
        if done[b]:
            continue
        if t in config.stop_tokens:
            done[b] = True
        else:
            new[b].append(t)
            done[b] = len(new[b]) == config.max_new_tokens
    return all(done)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as Hugging Face applies it): a seen token's logit ``l`` becomes
    ``l / penalty`` if positive, else ``l * penalty``."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _check_prompts(prompts, cfg: ModelConfig, config: GenerationConfig) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts, each a list of token ids")
    checked = []
    for i, prompt in enumerate(prompts):
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"prompt {i} must be a list of int token ids, got {prompt!r:.80}") from None
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside [0, vocab_size={cfg.vocab_size})")
        # A seq2seq prompt is the encoder's input; its decoder starts from one token.
        decoded = 1 if cfg.family == "seq2seq" else len(ids)
        if len(ids) > cfg.max_position or decoded + config.max_new_tokens > cfg.max_position:
            raise ValueError(f"prompt {i} is too long: {len(ids)} tokens and max_new_tokens={config.max_new_tokens} "
                             f"need more than the model's max_position={cfg.max_position} positions")
        checked.append(ids)
    for t in config.stop_tokens:
        if not 0 <= t < cfg.vocab_size:
            raise ValueError(f"stop token {t} is outside [0, vocab_size={cfg.vocab_size})")
    return checked


def _pad(rows: list[list[int]], device: torch.device) -> tuple:
    """Right-padded ids ``[B, S]`` and the mask of real tokens (None when no row is padded)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)
    if all(len(r) == width for r in rows):
        return ids, None
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return ids, torch.arange(width, device=device) < lengths[:, None]


@torch.inference_mode()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]],
             config: Optional[GenerationConfig] = None) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids; for seq2seq, the encoder's input).

    Raises ValueError for an empty prompt list, an empty prompt, a token outside the vocabulary,
    or a prompt that with ``max_new_tokens`` would pass the model's ``max_position``.
    """
    config = config or GenerationConfig()
    cfg = model.config
    prompts = _check_prompts(prompts, cfg, config)
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    if cfg.family == "seq2seq":
        encoder_output = model.encode(*_pad(prompts, device))
        starts = [[cfg.decoder_start_token_id] for _ in prompts]

        def forward(ids, mask, kv, logits_at, run=model):
            return run(decoder_input_ids=ids, decoder_attention_mask=mask, encoder_output=encoder_output,
                       kv=kv, logits_at=logits_at).logits[:, -1]
    else:
        starts = prompts

        def forward(ids, mask, kv, logits_at, run=model):
            return run(ids, attention_mask=mask, kv=kv, logits_at=logits_at).logits[:, -1]

    batch = len(starts)
    # Streamed weights move between steps (hooks), which neither a replayed graph nor a compiled
    # (fullgraph) step would do. Weights that all stay on the device move nothing, so their steps
    # replay as graphs (compile is still left to unstreamed models).
    streamed = is_streamed(model)
    moving = streamed and model.weight_stream.moves_weights
    session, kept = _open_session(model, config, [len(s) + config.max_new_tokens for s in starts], device, dtype,
                                  graphs=config.graphs and not moving)
    cache = session.cache
    try:
        ids, mask = _pad(starts, device)
        positions = torch.arange(ids.shape[1], device=device).expand(ids.shape)
        last = torch.tensor([len(s) - 1 for s in starts], device=device)
        logits = forward(ids, mask, cache.step(positions, mask), last)
        seen = torch.zeros(batch, cfg.vocab_size, dtype=torch.int32, device=device)
        seen = seen.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32) if mask is None else mask.int()) > 0
        new: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        rows = torch.arange(batch, device=device)

        run = compiled_forward(model) if config.compile and not streamed else model

        def decode(tokens):  # one new token per sequence: fixed shapes, so one graph serves every step
            positions = cache.lengths[:, None].clone()  # step() advances the lengths in place
            return forward(tokens, None, cache.step(positions), None, run)
        decode_step = session.step
        decode_step.fn = decode  # a graph captured by an earlier call replays the same step on the same tensors
        for _ in range(config.max_new_tokens):
            tokens = choose_tokens(logits, seen, config, generator)
            if record_tokens(tokens, new, done, config):
                break
            seen[rows, tokens] = True
            logits = decode_step(tokens[:, None])
    finally:
        session.in_use = False
        if kept and _KEPT_SESSIONS.get(model) is session:
            session.step.fn = None  # the step's function holds the model: a kept session must not
        else:  # not kept, or released while this call ran
            session.close()
    return new
