"""The serving engine: one base model, an adapter pool, and continuous batching of requests across adapters.

One worker thread owns the model. Each turn it

1. drops the rows whose client went away,
2. admits waiting requests (up to `max_batch` rows and `max_prefill_tokens` padded prompt tokens) and runs their
   prompts as one left-padded forward, then merges their KV cache into the running batch (`kvcache.concat`), or
3. runs one decoding step for every running row at once.

Rows are kept sorted by adapter, so each adapter's rows are a contiguous slice and `splice.mixed_batch` adds its
low-rank product to those rows without a gather: the base matmuls run once for the whole batch and the adapter
products once per group of rows (S-LoRA, https://arxiv.org/abs/2311.03285; Punica, https://arxiv.org/abs/2310.18547).

`mixed=False` is the baseline that serving with PEFT amounts to: the running batch holds one adapter at a time
(`set_adapter` between batches), and requests for other adapters wait until it drains.

Tokens leave through each request's `emit` callback, which must not block (the HTTP layer hands them to the event
loop), so a slow client never holds up the batch.
"""
from __future__ import annotations

import contextlib
import inspect
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.inject import adapter_layers
from splice.adapters.model import disable_adapters, mixed_batch, set_adapter
from splice.errors import SpliceError
from splice.serve import kvcache
from splice.serve.pool import AdapterPool

Event = tuple[str, Any]  # ("token", id) | ("done", "stop" | "length" | "cancelled") | ("error", message)


@dataclass
class SamplingParams:
    """How one request decodes. temperature 0 is greedy (argmax), the same tokens as `generate(do_sample=False)`."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(eq=False)
class Request:
    """One sequence to generate (causal LM) or embed (encoder)."""

    ids: list[int]
    adapter: str | None
    emit: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    embed: bool = False
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Called from any thread: the row leaves the batch at the engine's next turn."""
        self.cancelled = True


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    max_rows: int = 0
    max_adapters: int = 0  # most distinct adapters (base included) in one decoding step
    cancelled: int = 0


class Engine:
    """Serve one base model with many adapters.

    Args:
        model: a transformers model (causal LM for generation, encoder for embeddings) in eval mode.
        pool: the adapter pool over the same model.
        kind: "causal-lm" or "encoder".
        max_batch: most rows decoded together.
        max_prefill_tokens: most padded prompt tokens in one prefill forward (bounds its memory).
        mixed: False serves one adapter per batch (the PEFT-style baseline).
    """

    def __init__(self, model: nn.Module, pool: AdapterPool, kind: str = "causal-lm", *, max_batch: int = 32,
                 max_prefill_tokens: int = 4096, mixed: bool = True):
        if kind not in ("causal-lm", "encoder"):
            raise SpliceError(f"engine kind {kind!r} must be 'causal-lm' or 'encoder'")
        if int(max_batch) < 1 or int(max_prefill_tokens) < 1:  # 0 would admit nothing and spin forever
            raise SpliceError(f"max_batch ({max_batch}) and max_prefill_tokens ({max_prefill_tokens}) must be ≥ 1")
        self.model, self.pool, self.kind = model, pool, kind
        self.max_batch, self.max_prefill_tokens, self.mixed = int(max_batch), int(max_prefill_tokens), mixed
        self.device = next(model.parameters()).device
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); older releases know only it.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Prefill needs the logits of the last position only (the LM head is costly with a large vocabulary).
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # Held for every forward and every change to the model's adapters (the pool's loads and evictions).
        self.lock = pool.lock
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._rows: list[Request] = []
        self._cache = None
        self._mask: Tensor | None = None  # (rows, columns) 1 = real token
        self._batch_adapter: str | None = None  # the one adapter of the batch when not mixed
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="splice-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in list(self._waiting) + self._rows:
            self._finish(req, ("error", "the server is shutting down"))
        self._waiting.clear()
        self._rows, self._cache, self._mask = [], None, None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ------------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue a request; its adapter must already be acquired from the pool.

        The engine releases that hold when the request finishes, and also when `submit` refuses it (SpliceError).
        """
        try:
            if req.embed != (self.kind == "encoder"):
                raise SpliceError("embeddings need an encoder model and completions a causal LM; this server runs "
                                  f"a {self.kind}")
            if req.params.temperature > 0:
                seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
                try:
                    req._generator = torch.Generator().manual_seed(seed)
                except (ValueError, RuntimeError) as exc:
                    raise SpliceError(f"seed {seed}: {exc} (seeds are 64-bit integers)") from None
            with self._wake:
                if self._stop:  # nothing would ever take it off the queue
                    raise SpliceError("the engine is stopped; start() it before submitting requests")
                self._waiting.append(req)
                self._wake.notify()
        except SpliceError:
            if req.adapter is not None:
                self.pool.release(req.adapter)
            raise
        return req

    def generate(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                 params: SamplingParams | None = None) -> list[list[int]]:
        """Submit prompts together and wait for all of them (the library way in; the server uses `submit`).

        Returns:
            The generated token ids of each prompt (embeddings for an encoder: one list of floats each).
        """
        done = threading.Semaphore(0)
        results: list[Any] = [None] * len(prompts)
        requests = []

        def sink(i: int) -> Callable[[Event], None]:
            def emit(ev: Event) -> None:
                if ev[0] == "embedding":
                    results[i] = ev[1]
                elif ev[0] == "error":
                    results[i] = SpliceError(ev[1])
                if ev[0] in ("done", "error"):
                    done.release()
            return emit

        for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            if adapter is not None:
                self.pool.acquire(adapter)
            requests.append(self.submit(Request(list(ids), adapter, sink(i), params or SamplingParams(),
                                                embed=self.kind == "encoder")))
        for _ in prompts:
            done.acquire()
        for i, req in enumerate(requests):
            if isinstance(results[i], Exception):
                raise results[i]
            if not req.embed:
                results[i] = req.generated
        return results

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self._turn()
            except Exception as exc:  # a failed decoding step fails the running rows, never the worker
                self._fail(self._rows, exc)
                self._rows, self._cache, self._mask = [], None, None

    def _turn(self) -> None:
        with self.lock:
            self._drop([(r, "cancelled") for r in self._rows if r.cancelled])
            new = self._admit()
            if not new:
                if self._rows:
                    self._decode()
                return
            try:
                self._embed(new) if self.kind == "encoder" else self._prefill(new)
            except Exception as exc:  # the new rows fail; the running batch is untouched until the merge
                merged = any(r in self._rows for r in new)
                self._fail([r for r in new if r not in self._rows], exc)
                if merged:  # failed after the merge: the batch's state is unknown, so fail it as well
                    raise

    def _fail(self, rows: list[Request], exc: Exception) -> None:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        for req in rows:
            self._finish(req, ("error", message))

    def _admit(self) -> list[Request]:
        new: list[Request] = []
        with self._wake:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                self.stats.cancelled += 1
                self._finish(req, ("done", "cancelled"))
            if not self.mixed and not self._rows:
                self._batch_adapter = self._waiting[0].adapter if self._waiting else None
            longest, kept = 0, deque()
            while self._waiting and len(self._rows) + len(new) < self.max_batch:
                req = self._waiting.popleft()
                if not self.mixed and req.adapter != self._batch_adapter:
                    kept.append(req)  # waits for a batch of its own adapter
                    continue
                longest_if = max(longest, len(req.ids))
                if new and longest_if * (len(new) + 1) > self.max_prefill_tokens:
                    kept.append(req)
                    break
                longest = longest_if
                new.append(req)
            self._waiting.extendleft(reversed(kept))
        return new

    # -- forward passes ------------------------------------------------------------------------------------------
    def _adapters(self, names: list[str | None]):
        if self.mixed:
            return mixed_batch(self.model, names)
        if self._batch_adapter is None:
            return _maybe_disabled(self.model)
        set_adapter(self.model, self._batch_adapter)
        return contextlib.nullcontext()

    def _prefill(self, new: list[Request]) -> None:
        new.sort(key=_adapter_key)
        width = max(len(r.ids) for r in new)
        ids = torch.zeros(len(new), width, dtype=torch.long)
        mask = torch.zeros(len(new), width, dtype=torch.long)
        for i, r in enumerate(new):  # left padding: the last column is every row's last prompt token
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        cache = kvcache.new_cache()
        with self._adapters([r.adapter for r in new]):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=_positions(mask).to(self.device), **{self._cache_arg: cache},
                                use_cache=True, **self._last_only).logits[:, -1]
        self.stats.prefills += 1
        if self._rows:
            cache, mask = kvcache.concat(self._cache, self._mask, cache, mask)
        rows = self._rows + new
        order = sorted(range(len(rows)), key=lambda i: _adapter_key(rows[i]))
        if order != list(range(len(rows))):  # keep each adapter's rows contiguous
            cache, mask = kvcache.select(cache, mask, torch.tensor(order))
            rows = [rows[i] for i in order]
        self._rows, self._cache, self._mask = rows, cache, mask
        self._take(new, self._sample(logits, new))

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], 1)
        positions = (mask.sum(1, keepdim=True) - 1)
        with self._adapters([r.adapter for r in rows]):
            logits = self.model(input_ids=ids, attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), **{self._cache_arg: self._cache},
                                use_cache=True).logits[:, -1]
        self._mask = mask
        self.stats.steps += 1
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self.stats.max_adapters = max(self.stats.max_adapters, len({r.adapter for r in rows}))
        self._take(rows, self._sample(logits, rows))

    def _embed(self, new: list[Request]) -> None:
        new.sort(key=_adapter_key)
        width = max(len(r.ids) for r in new)
        ids = torch.zeros(len(new), width, dtype=torch.long)
        mask = torch.zeros(len(new), width, dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, : len(r.ids)] = torch.tensor(r.ids)
            mask[i, : len(r.ids)] = 1
        with self._adapters([r.adapter for r in new]):
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        pooled = F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)  # mean over real tokens, unit norm
        for i, r in enumerate(new):
            r.emit(("embedding", pooled[i].float().tolist()))
            self._finish(r, ("done", "stop"))

    # -- tokens out ----------------------------------------------------------------------------------------------
    def _sample(self, logits: Tensor, rows: list[Request]) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature > 0:
                # Shift by the max first: a tiny temperature then sends the other logits to -inf (probability
                # 0), where logits / T alone overflows to inf and softmax gives NaN.
                row = logits[i].float()
                probs = torch.softmax((row - row.max()) / p.temperature, -1)
                if p.top_p < 1:  # keep the smallest set of tokens whose probability reaches top_p
                    sorted_p, idx = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p > p.top_p
                    probs = probs.clone().index_fill_(0, idx[drop], 0.0)
                tokens[i] = int(torch.multinomial(probs.cpu(), 1, generator=r._generator))
        return tokens

    def _take(self, rows: list[Request], tokens: list[int]) -> None:
        finished = []
        for r, t in zip(rows, tokens):
            r.generated.append(t)
            self.stats.tokens += 1
            r.emit(("token", t))
            if t in r.params.stop_token_ids:
                finished.append((r, "stop"))
            elif len(r.generated) >= r.params.max_tokens:
                finished.append((r, "length"))
        self._drop(finished)

    def _drop(self, gone: list[tuple[Request, str]]) -> None:
        """Finish the `(row, reason)` pairs and take them out of the batch with one copy of the cache."""
        if not gone:
            return
        gone_ids = {id(r) for r, _ in gone}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone_ids]
        for r, reason in gone:
            self.stats.cancelled += reason == "cancelled"
            self._finish(r, ("done", reason))
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._cache, self._mask = kvcache.select(self._cache, self._mask, torch.tensor(keep))
        self._rows = [self._rows[i] for i in keep]

    def _finish(self, req: Request, event: Event) -> None:
        if req.adapter is not None:
            self.pool.release(req.adapter)
        req.emit(event)


def _adapter_key(req: Request) -> str:
    return "" if req.adapter is None else "~" + req.adapter  # the base rows first, then adapters by name


def _positions(mask: Tensor) -> Tensor:
    """Position of each token among its row's real tokens (padding gets 0; the mask hides it anyway)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def _maybe_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    return disable_adapters(model) if any(True for _ in adapter_layers(model)) else contextlib.nullcontext()
