"""
Inference: a KV cache, sampling, and the Engine that generates for several samples at once with tool use.

The model calls a tool by writing <|python_start|> call <|python_end|>; the Engine runs it and forces
<|output_start|> result <|output_end|> into that row's stream (never trained on), then the model continues. Two tools:
"search: QUERY" asks the knowledge base the Engine was given (nanochat/retrieval.py) and gets its passages back;
any other call is an expression for the calculator.
"""

import ast
import codecs
import operator
import threading
import time
import warnings
from collections import deque

import torch
import torch.nn.functional as F


class KVCache:
    """
    The decoding state of every layer. Attention layers: keys and values, one (B, H_kv, T_max, D) tensor each per
    layer (apart, so a compiled step writes one in place without copying the others), filled as tokens arrive. Other mixers (Mamba) keep a dict of batch-first tensors in states[layer],
    whatever its size, which they replace as they go. Parts that look a few tokens back (the smear, Engram's n-grams
    and conv) keep those tokens' values in tails (see recent). pos counts the tokens already cached (the same for
    every row). rewind takes back the last tokens, for self-speculative decoding's rejected drafts.
    """
    REWIND = 1  # how many positions rewind may take back: a tail keeps that many more than its users need

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype, attention_layers=None):
        attention_layers = range(num_layers) if attention_layers is None else attention_layers
        self.slot = {layer: i for i, layer in enumerate(attention_layers)}
        self.device = device
        shape = (batch_size, num_heads, seq_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.slot]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.slot]
        self.batch_size, self.capacity = batch_size, seq_len
        self.states = {}
        self.tails = {}
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        c = model.config
        attention_layers = [i for i, w in enumerate(model.windows) if w is not None]
        # the heads this process computes: all of them, or its share under tensor parallelism (nanochat/parallel.py)
        from nanochat.gpt import CausalSelfAttention
        heads = next((m.n_kv_head for m in model.modules() if isinstance(m, CausalSelfAttention)), c.n_kv_head)
        return cls(batch_size, heads, seq_len, c.n_embd // c.n_head, c.n_layer, model.get_device(), model.compute_dtype,
                   attention_layers)

    def insert(self, layer, k, v):
        """Store this step's (B, H_kv, T, D) keys and values; return everything cached so far for the layer."""
        end, slot = self.pos + k.size(2), self.slot[layer]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[slot][:, :, self.pos:end] = k
        self.v[slot][:, :, self.pos:end] = v
        return self.k[slot][:, :, :end], self.v[slot][:, :, :end]

    def attend(self, layer, q, k, v, window):
        """Attention of this step's queries over the layer's cache, once their keys and values (k, v) are stored."""
        from nanochat.gpt import attention
        offset = self.pos
        k, v = self.insert(layer, k, v)
        return attention(q, k, v, window, q_offset=offset)

    def rotary(self, cos, sin, T):
        """The rotary tables' rows for this step's T positions."""
        end = self.pos + T
        assert end <= cos.size(1), f"sequence of {end} tokens exceeds the rotary table ({cos.size(1)})"
        return cos[:, self.pos:end], sin[:, self.pos:end]

    def advance(self, n):
        self.pos += n

    def recent(self, name, new, keep, pad=0.0):
        """
        The keep values before new (B, T, ...) along time, from earlier calls (pad before the first token); records
        new. The model calls this once per forward pass for each name.
        """
        past = self.tails.get(name)
        if past is None:
            past = new.new_full((new.size(0), keep, *new.shape[2:]), pad)
        full = torch.cat([past, new], dim=1)
        self.tails[name] = full[:, -(keep + self.REWIND):]
        return full[:, -(keep + new.size(1)):-new.size(1)]

    def rewind(self, n):
        """Forget the last n tokens (at most REWIND). Mamba's running state cannot be taken back: the Engine does not
        speculate with Mamba layers; states cut at pos (sparse attention's indexer keys) need nothing."""
        if n > self.REWIND:
            raise ValueError(f"this cache takes back at most {self.REWIND} tokens, not {n}")
        self.pos -= n
        self.tails = {name: t[:, :-n] for name, t in self.tails.items()}

    def prefill(self, other):
        """Copy a batch-1 cache into every row of this one (prefill once, then sample many)."""
        if other.batch_size != 1 or other.pos > self.capacity:
            raise ValueError("prefill copies a batch-1 cache that fits")
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[:, :, :other.pos] = theirs[:, :, :other.pos]
        self.states = {layer: {name: t.expand(self.batch_size, *t.shape[1:]).clone() for name, t in state.items()}
                       for layer, state in other.states.items()}
        self.tails = {name: t.expand(self.batch_size, *t.shape[1:]).clone(memory_format=torch.contiguous_format)
                      for name, t in other.tails.items()}
        self.pos = other.pos


class StaticKVCache(KVCache):
    """
    A KVCache for compiled decoding, one token per row per step: every step has the same shapes and reads no Python
    number, so torch.compile builds its graph once. The position is a tensor (pos reads it); attention runs over the
    whole buffer, masked to the positions written, and the tails keep a fixed shape. The buffers' batch and length
    are marked dynamic: one graph serves every cache size, and every batch size above 1.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for t in self.k + self.v:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)

    @property
    def pos(self):
        return int(self.position)

    @pos.setter
    def pos(self, value):
        self.position = torch.full((1,), value, dtype=torch.long, device=self.device)

    def attend(self, layer, q, k, v, window):
        assert q.size(2) == 1, "a StaticKVCache decodes one token per row per step"
        keys, values = self.k[self.slot[layer]], self.v[self.slot[layer]]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        at = torch.arange(keys.size(2), device=q.device)
        visible = (at <= self.position) & (self.position - at <= window)  # (T_max,)
        if q.device.type != "cpu":
            from nanochat.gpt import sdpa
            return sdpa(q, keys, values, attn_mask=visible.unsqueeze(0), enable_gqa=q.size(1) != keys.size(1))
        # On a CPU, written out in fp32 (as SDPA's CPU kernels compute): one query over a small masked buffer, which
        # compiled runs several times faster than SDPA's CPU kernel with a mask (d4, batch 8: 2,000 tok/s, not 1,000)
        if q.size(1) != keys.size(1):  # grouped-query attention: each key head serves a group of query heads
            keys, values = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (keys, values))
        scores = (q.float() @ keys.float().transpose(-1, -2)) * q.size(-1) ** -0.5
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        return (weights @ values.float()).to(q.dtype)

    def rotary(self, cos, sin, T):
        assert T == 1, "a StaticKVCache decodes one token per row per step"
        return cos.index_select(1, self.position), sin.index_select(1, self.position)

    def advance(self, n):
        self.position += n

    def recent(self, name, new, keep, pad=0.0):
        past = super().recent(name, new, keep, pad)
        # the same strides every step (prefill's too), or the compiled graph would be rebuilt
        self.tails[name] = self.tails[name].clone(memory_format=torch.contiguous_format)
        return past


def rotary(cache, cos, sin, T):
    """The rotary tables' rows for T new positions: from the start, or after what the cache holds."""
    if cache is None:
        assert T <= cos.size(1), f"sequence of {T} tokens exceeds the rotary table ({cos.size(1)})"
        return cos[:, :T], sin[:, :T]
    return cache.rotary(cos, sin, T)


def recent(cache, name, new, keep, pad=0.0):
    """The keep values before new (B, T, ...) along time: from the cache when decoding (cache.recent), else pads."""
    if cache is None:
        return new.new_full((new.size(0), keep, *new.shape[2:]), pad)
    return cache.recent(name, new, keep, pad)


# -----------------------------------------------------------------------------
# The calculator tool

_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv}
_STRING_METHODS = {"lower", "upper", "strip"}


def use_calculator(expr, time_limit=1.0, max_len=1000):
    """
    Evaluate the model's tool call: arithmetic (+ - * / // and parentheses on numbers) or a string's .count(...),
    e.g. 'strawberry'.count('r'). Returns None for anything else, errors included. It walks the expression's syntax
    tree itself instead of calling eval, so nothing but these operations can run, and it checks a deadline as it
    goes: safe to call from any thread (the SIGALRM timeouts of eval-based calculators only work on the main thread).
    """
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > max_len or "**" in expr:
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    deadline = time.monotonic() + time_limit

    def value(node):
        if time.monotonic() > deadline:
            raise TimeoutError
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = value(node.operand)
            if not isinstance(operand, (int, float)):
                raise ValueError
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            left, right = value(node.left), value(node.right)
            if not all(isinstance(x, (int, float)) for x in (left, right)):
                raise ValueError
            return _ARITHMETIC[type(node.op)](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords:
            receiver, method = value(node.func.value), node.func.attr
            args = [value(a) for a in node.args]
            if not isinstance(receiver, str) or not all(isinstance(a, str) for a in args):
                raise ValueError
            if method == "count" and len(args) == 1:
                return receiver.count(args[0])
            if method in _STRING_METHODS and not args:
                return getattr(receiver, method)()
        raise ValueError

    try:
        result = value(tree)
    except (ValueError, TimeoutError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        result = int(result)  # 24/3 reads "8", as GSM8K's solutions write it, not "8.0"
    return result if isinstance(result, (int, float)) else None


# -----------------------------------------------------------------------------
# Sampling and generation

# Temperatures below this sample greedily. Dividing logits by a tiny temperature overflows to inf (15 / 1e-38 in fp32)
# and softmax then gives NaN; and at 1e-5 a logit gap of 0.001 already has odds of e^-100, so nothing is lost.
GREEDY_BELOW = 1e-5


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """(B, V) logits -> (B, 1) token ids. temperature 0 (or under GREEDY_BELOW) is greedy; top_k keeps the k likeliest."""
    if temperature < GREEDY_BELOW:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and 0 < top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        return indices.gather(1, draw(F.softmax(values / temperature, dim=-1), rng))
    return draw(F.softmax(logits / temperature, dim=-1), rng)


def draw(probs, rng):
    """One index per row of (B, V) probabilities, by inverting the cumulative distribution at a uniform draw: one
    random number per row, where torch.multinomial draws one per entry (on a CPU, 5-7x slower at V = 4096). The sums
    run in fp64, so even the least likely tokens keep their share."""
    cdf = probs.double().cumsum(dim=-1)
    if not torch.isfinite(cdf[:, -1]).all():
        raise ValueError("the model's logits are not finite (NaN or inf): nothing to sample from")
    u = torch.rand(probs.size(0), 1, generator=rng, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]  # sum: 1, rounded
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)  # right: skips zero-probability ids


class RowState:
    """One sample's progress: tokens queued to be forced (tool output), the tool-call buffer, whether it ended."""

    def __init__(self):
        self.forced = deque()
        self.python_expr = None  # the call's tokens, while inside <|python_start|> ... <|python_end|>
        self.completed = False


SEARCH = "search:"  # a tool call that starts so is a search of the knowledge base
_decode_lock = threading.Lock()  # compiled decoding steps, one at a time in a process (Engine._decode_step)


class Engine:
    def __init__(self, model, tokenizer, kb=None, retriever="bm25", passages=3, past_context=False, speculative=False,
                 compile=True):
        """
        kb: a retrieval.KnowledgeBase for search calls (None: they are told there is none). Generation stops at the
        context the model was trained on (config.sequence_len); past_context lets it run on to the end of the rotary
        tables (10x), untrained ground where answers usually degrade. speculative: a model trained with MTP modules
        drafts with them when one sample is asked for (self-speculative decoding; drafts counts them). compile: each
        decoding step of an attention-only GPT runs through torch.compile over a StaticKVCache; two graphs are built
        (batch 1, and any larger batch; both for any cache size), which takes seconds each, and the steps after run
        1.4-1.8x faster on a 2-core CPU (dev/bench_engine.py). compiled says whether it does.
        """
        from nanochat.parallel import is_sharded
        self.model = model
        self.tokenizer = tokenizer
        self.kb, self.retriever, self.passages = kb, retriever, passages
        self.past_context = past_context
        self.positions = model.cos.size(1) if past_context else model.config.sequence_len
        if speculative and getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding drafts with the model's MTP modules, and this model has none: "
                             "train one with base_train --mtp-depth=1")
        if speculative and any(w is None for w in model.windows):
            raise ValueError("speculative decoding takes rejected drafts back, and a Mamba layer's state cannot be")
        self.speculative = speculative
        self.drafts = {"proposed": 0, "accepted": 0}
        sp = tokenizer.encode_special
        self.stops = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        # a sharded model (training with --parallel fsdp/tp) decodes on every rank, each forward pass a collective:
        # every rank goes on with rank 0's tokens, so all of them stop after the same number of steps
        self.follow_rank0 = is_sharded(model) and torch.distributed.is_initialized()
        from nanochat.gpt import GPT, mixer_kinds
        self.compiled = (compile and isinstance(model, GPT) and set(mixer_kinds(model.config)) == {"A"}
                         and model.get_device().type in ("cpu", "cuda") and not self.follow_rank0)
        self.decode = model
        if self.compiled:
            self.decode = torch.compile(model, fullgraph=True)  # dynamic where StaticKVCache marks it

    def answer_budget(self, prompt_len, max_tokens):
        """How many tokens an answer to a prompt_len-token prompt may take: max_tokens, cut where the positions end."""
        return max(0, min(max_tokens, self.positions - prompt_len))

    def search(self, query):
        """The passages a search for query gets (the knowledge base memoises them: asking again for citations is free)."""
        return self.kb.search(query, self.passages, self.retriever)

    def run_tool(self, call):
        """A tool call's output text, or None when it has none (an expression the calculator cannot evaluate)."""
        if call.startswith(SEARCH):
            if self.kb is None:
                return "no knowledge base is loaded"
            from nanochat.retrieval import format_passages
            return format_passages(self.search(call[len(SEARCH):].strip()))
        result = use_calculator(call)
        return None if result is None else str(result)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        Yield (token_column, mask_column) per step: one token per sample, mask 1 if sampled, 0 if forced by a tool.
        Stops when every sample has ended (<|assistant_end|> or <|bos|>), after max_tokens steps (None: no limit),
        or where the positions generation may reach end (the trained context; see answer_budget), whichever is first.
        """
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of token ids")
        model = self.model
        device = model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        capacity = len(tokens) + self.answer_budget(len(tokens), self.positions if max_tokens is None else max_tokens)
        if capacity <= len(tokens):
            return
        rows = [RowState() for _ in range(num_samples)]
        if self.speculative and num_samples == 1:
            yield from self._speculate(tokens, rows[0], capacity, rng, temperature, top_k)
            return

        # 1) prefill the prompt once, at batch 1; every sample draws its first token from these logits independently
        prefill_cache = KVCache.for_model(model, 1, len(tokens))
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill_cache)[:, -1, :]
        logits = logits.expand(num_samples, -1)
        # 2) copy the prompt's cache into each sample's row
        cache = (StaticKVCache if self.compiled else KVCache).for_model(model, num_samples, capacity)
        cache.prefill(prefill_cache)
        del prefill_cache
        first = True
        while not all(r.completed for r in rows) and cache.pos < capacity:
            column = self._take(rows, sample_next_token(logits, rng, temperature, top_k)[:, 0])
            yield column
            ids = torch.tensor(column[0], dtype=torch.long, device=device).unsqueeze(1)
            logits = self._decode_step(ids, cache, first)[:, -1, :]
            first = False

    def _decode_step(self, ids, cache, first):
        """
        One decoding step. Compiled, only the first step of a generation checks all the graph's guards: the steps
        after it bring the same model, shapes and cache (only the cache's contents and position change), so they check
        only the guards that tell the graphs apart. On a 2-core CPU that took the guard check from 93 to 43 us a step,
        and d4 decoded 4-6% faster at batch 1 (two interleaved runs: 991 -> 1,055 and 1,007 -> 1,051 tok/s). The
        stance is process-wide, so decoding threads (chat_web's workers, one per GPU) take turns: one thread's skipped
        checks never cover another's first step. Skipping is safe only after a first step that ran compiled: when
        torch.compile stops compiling new graphs of the model's forward (recompile_limit: 8 kinds of model in a
        process, say), the step fails instead of running eagerly (fullgraph), and this engine decodes eagerly from
        then on.
        """
        if self.compiled:
            try:
                with _decode_lock, torch.compiler.set_stance(skip_guard_eval_unsafe=not first):
                    return self.decode(ids, kv_cache=cache)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                warnings.warn("torch.compile's recompile_limit is reached in this process: this engine decodes eagerly")
                self.compiled, self.decode = False, self.model
        return self.decode(ids, kv_cache=cache)

    def _take(self, rows, sampled):
        """Each row's next token, from the (B,) sampled ones or what a tool forces; runs the tool calls. -> (column, masks)"""
        if self.follow_rank0:
            torch.distributed.broadcast(sampled, src=0)
        column, masks = [], []
        for row, token in zip(rows, sampled.tolist()):
            is_forced = bool(row.forced)
            token = row.forced.popleft() if is_forced else token
            column.append(token)
            masks.append(0 if is_forced else 1)
            if token in self.stops:
                row.completed = True
            # the tool state machine
            if token == self.python_start:
                row.python_expr = []
            elif token == self.python_end and row.python_expr is not None:
                result = self.run_tool(self.tokenizer.decode(row.python_expr).strip())
                row.python_expr = None
                if result is not None:
                    row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            elif row.python_expr is not None:
                row.python_expr.append(token)
        return column, masks

    def _speculate(self, tokens, row, capacity, rng, temperature, top_k):
        """
        One sample, self-speculative (nanochat/mtp.py): each main forward takes the newest token and the first MTP
        module's draft of the one after it. The token sampled after the newest is the plain model's choice; when it
        equals the draft, the draft's position was computed right and the forward's second logits give one more
        token for free. Otherwise the draft's position is taken back (KVCache.rewind). Every token comes from the main
        model's own distribution, so greedy output is exactly plain decoding's.
        """
        model, c = self.model, self.model.config
        ids = lambda t: torch.tensor([t], dtype=torch.long, device=model.get_device())
        cache = KVCache.for_model(model, 1, capacity + 1)  # + the last draft's position
        draft_cache = KVCache(1, c.n_kv_head, capacity + 1, c.n_embd // c.n_head, 1, model.get_device(),
                              model.compute_dtype, attention_layers=[c.n_layer])  # the first MTP module's block
        h = model.hidden(ids(tokens), kv_cache=cache)
        # pending: the main model's hidden states not yet given to MTP; nexts: the tokens after them, but the newest
        pending, nexts = h, tokens[1:]
        column = self._take([row], sample_next_token(model.head(h[:, -1]), rng, temperature, top_k)[:, 0])
        yield column
        left = capacity - len(tokens) - 1
        while left and not row.completed:
            token = column[0][0]
            draft = model.mtp.draft(model, pending, ids(nexts + [token]), draft_cache).argmax(-1, keepdim=True)
            h = model.hidden(torch.cat([ids([token]), draft], dim=1), kv_cache=cache)
            logits = model.head(h)
            self.drafts["proposed"] += 1
            column = self._take([row], sample_next_token(logits[:, 0], rng, temperature, top_k)[:, 0])
            yield column
            left -= 1
            if column[0][0] != draft.item():
                cache.rewind(1)
                pending, nexts = h[:, :1], []
                continue
            self.drafts["accepted"] += 1
            pending, nexts = h, [draft.item()]
            if left and not row.completed:
                column = self._take([row], sample_next_token(logits[:, 1], rng, temperature, top_k)[:, 0])
                yield column
                left -= 1

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate to the end: (sequences, masks), each with the prompt and without the final stop token."""
        stops = self.stops
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in stops:
                    done[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return sequences, masks


def add_decoding_flags(parser):
    """chat_cli's and chat_web's flags for how their Engine decodes (engine_from_flags builds it)."""
    parser.add_argument("--past-context", action="store_true", help="let answers run past the context the model was "
                        "trained on, to the end of its rotary tables (10x): untrained ground, where answers usually degrade")
    parser.add_argument("--speculative", action="store_true", help="a model trained with MTP modules (base_train "
                        "--mtp-depth) drafts a token ahead with them: the same answers, faster when the drafts hit")
    parser.add_argument("--eager", action="store_true", help="decode without torch.compile: the first answer starts "
                        "sooner (no compiling), every token after comes slower")


def engine_from_flags(model, tokenizer, kb, args):
    """The Engine for add_decoding_flags' and retrieval.add_kb_flags' flags; a model --speculative cannot use is one line."""
    from nanochat.common import UserError
    try:
        return Engine(model, tokenizer, kb, args.retriever, args.passages, args.past_context, args.speculative,
                      compile=not args.eager)
    except ValueError as e:
        raise UserError(f"--speculative: {e}") from None


class TextStream:
    """
    Generated token ids in, display text out, one token at a time: UTF-8 characters split across tokens come out
    whole, and a tool call shows whole once its output has come: "[calculator: 12*3 = 36]", or with search (the
    Engine's, to name the passages found) "[search: QUERY -> Title; Title]". searches lists the queries whose passages came back so far.
    """

    def __init__(self, tokenizer, search=None):
        self.tokenizer, self.search = tokenizer, search
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.specials = tokenizer.special_token_ids()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tool = None  # a call's tokens from <|python_start|> on, until its output has ended
        self.searches = []

    def push(self, token):
        text = self.decoder.decode(b"", final=True) if token in self.specials else ""  # flush before a marker
        if self.tool is not None:
            if self.tool[-1:] == [self.python_end] and token != self.output_start:  # the call got no output
                return text + self.flush() + self.push(token)
            self.tool.append(token)
            return text + (self.flush() if token == self.output_end else "")
        if token == self.python_start:
            self.tool = [token]
            return text
        if token in self.specials:  # end of turn and the like: not text
            return text
        return text + self.decoder.decode(self.tokenizer.decode_single_token_bytes(token))

    def flush(self):
        """The tool call under way, as far as it got, shown whole ("" when there is none)."""
        if self.tool is None:
            return ""
        tool, self.tool = self.tool[1:], None
        end = tool.index(self.python_end) if self.python_end in tool else len(tool)
        call = self.tokenizer.decode(tool[:end]).strip()
        output = tool[end + 2:-1] if tool[end + 1:end + 2] == [self.output_start] and tool[-1] == self.output_end else None
        if call.startswith(SEARCH):
            query = call[len(SEARCH):].strip()
            if output is not None:  # it ran: an answer cut off inside its call read nothing
                self.searches.append(query)
            found = "; ".join(p.title for p in self.search(query)) if self.search and output is not None else ""
            return f"[search: {query}{' -> ' + found if found else ''}]"
        return f"[calculator: {call}{' = ' + self.tokenizer.decode(output) if output is not None else ''}]"
