"""
Talk to a model in the terminal.

    python -m scripts.chat_cli                     # the latest SFT model; 'clear' starts over, 'quit' leaves
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one answer, then exit
    python -m scripts.chat_cli -i base -g d4       # any stage: base, mid, sft, rl
    python -m scripts.chat_cli -i rl --kb wiki     # the model may search knowledge base wiki (scripts/rag_index.py)

Ctrl-C stops an answer and keeps the conversation; Ctrl-C twice at the prompt leaves. A conversation longer than the
model reads loses its oldest turns, with a note, under the same limits chat_web applies.
"""

import signal
import time

from nanochat.common import Flags, UserError, check_minimums, compute_init, get_compute_dtype, print_result, run_cli
from nanochat.engine import add_decoding_flags
from nanochat.retrieval import add_kb_flags, open_kb


def drop_oldest_turns(tokens, user_start, limit):
    """Cut whole turns after the leading <|bos|>, oldest first, until the conversation is shorter than limit or only
    the newest turn is left. Returns (tokens, turns dropped)."""
    dropped = 0
    while len(tokens) >= limit:
        starts = [i for i, t in enumerate(tokens) if t == user_start]
        if len(starts) < 2:
            break
        tokens, dropped = tokens[:1] + tokens[starts[1]:], dropped + 1
    return tokens, dropped


def main(argv=None):
    p = Flags(description="Chat with a nanochat model in the terminal.")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="longest answer, in tokens")
    add_decoding_flags(p)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    add_kb_flags(p)
    args = p.parse_args(argv)
    check_minimums(args, {"-t/--temperature": 0, "-k/--top-k": 0, "-m/--max-tokens": 1})
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("-p/--prompt is empty: give the text to answer, or leave -p out to chat")
    kb = open_kb(args)

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import TextStream, engine_from_flags

    # Ctrl-C stops an answer even when this was started from a script, whose background jobs ignore it by default
    signal.signal(signal.SIGINT, signal.default_int_handler)

    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, _ = load_model(args.source, device, get_compute_dtype(device.type)[0], model_tag=args.model_tag, step=args.step)
    engine = engine_from_flags(model, tokenizer, kb, args)
    sp = tokenizer.encode_special
    bos, user_start, assistant_end = tokenizer.get_bos_token_id(), sp("<|user_start|>"), sp("<|assistant_end|>")
    prompt_limit = model.config.sequence_len  # a prompt must be shorter than the context the model was trained on
    tokens = [bos]  # the whole conversation, tool calls included, exactly as the model saw and wrote it
    turns, generated, searches, seconds, last_answer, interrupted = 0, 0, 0, 0.0, "", False
    if not args.prompt:
        print("nanochat: type a message; 'clear' starts a new conversation, 'quit' or 'exit' (or Ctrl-D) leaves. "
              "Ctrl-C stops an answer.")
    while True:
        if args.prompt:
            user = args.prompt
        else:
            try:
                user = input("\nUser: ").strip()
            except EOFError:
                break
            except KeyboardInterrupt:  # once may be a stray press after stopping an answer; twice in a row leaves
                if interrupted:
                    break
                interrupted = True
                print("\n(Ctrl-C again, or 'quit', to leave)")
                continue
            interrupted = False
            if user.lower() in ("quit", "exit"):
                break
            if user.lower() == "clear":
                tokens = [bos]
                print("(new conversation)")
                continue
            if not user:
                continue
        turn = [user_start, *tokenizer.encode(user), sp("<|user_end|>"), sp("<|assistant_start|>")]
        if len(turn) + 1 >= prompt_limit:
            message = f"that message is {len(turn)} tokens; this model reads at most {prompt_limit - 1}: write a shorter one"
            if args.prompt:
                raise UserError(message)
            print(f"({message})")
            continue
        tokens, dropped = drop_oldest_turns(tokens + turn, user_start, prompt_limit)
        if dropped:
            print(f"(the conversation outgrew the {prompt_limit} tokens this model reads: dropped the oldest "
                  f"{'turn' if dropped == 1 else f'{dropped} turns'})")
        print("\nAssistant: ", end="", flush=True)
        stream, answer, t0 = TextStream(tokenizer, engine.search if kb else None), [], time.time()
        budget, start, ended = engine.answer_budget(len(tokens), args.max_tokens), len(tokens), False
        try:
            for column, _ in engine.generate(tokens, max_tokens=budget,
                                             temperature=args.temperature, top_k=args.top_k or None, seed=int(time.time())):
                token = column[0]
                if token in (assistant_end, bos):
                    ended = True
                    break
                tokens.append(token)
                piece = stream.push(token)
                answer.append(piece)
                generated += 1
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            if args.prompt:
                raise
            print(" [stopped]", end="")
        answer.append(stream.flush())  # a tool call the answer stopped in
        print(answer[-1], end="")
        if not ended and len(tokens) - start == budget < args.max_tokens:  # the context ran out, not -m
            print(f" [stopped: the conversation filled the {engine.positions} tokens this model "
                  f"{'can place' if args.past_context else 'was trained on; --past-context lets answers run on'}]", end="")
        searches += len(stream.searches)
        tokens.append(assistant_end)  # also when the length limit or Ctrl-C stopped the answer
        seconds += time.time() - t0
        print()
        turns += 1
        last_answer = "".join(answer)
        if args.prompt:
            break
    if not args.prompt:
        print()  # end the last "User: " prompt's line
    print_result("chat_cli", source=args.source, kb=args.kb, searches=searches, turns=turns, tokens_generated=generated,
                 tokens_per_second=round(generated / seconds, 2) if seconds else None, compiled=engine.compiled and not args.speculative,
                 last_answer=last_answer,
                 **({"drafts": engine.drafts["proposed"], "drafts_accepted": engine.drafts["accepted"]} if args.speculative else {}))


if __name__ == "__main__":
    run_cli(main)
