"""
Train the BPE tokenizer on the pretraining shards and save it with each token's byte length.

    python -m scripts.tok_train --vocab-size=32768 --max-chars=2000000000 --doc-cap=10000
    python -m scripts.tok_train --fim      # also the fill-in-the-middle tokens, for base_train --fim-rate
"""

import os
import time

from nanochat.common import Flags, UserError, print_result, run_cli
from nanochat.dataset import parquets_iter_batched, split_files
from nanochat.tokenizer import RustBPETokenizer, check_vocab_size, special_tokens, tokenizer_dir

ROUND_TRIP_TEXT = "Hello world! Ünïcödé, 中文, 한국어, emoji 🤖👍🏽, numbers 12345 and\ttabs\n\nnew lines."


def main(argv=None):
    parser = Flags(description="Train the tokenizer on the train shards.")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size, special tokens included")
    parser.add_argument("--fim", action="store_true", help="add the fill-in-the-middle tokens <|fim_prefix|>, "
                        "<|fim_suffix|>, <|fim_middle|> (needed by base_train --fim-rate)")
    args = parser.parse_args(argv)
    check_vocab_size(args.vocab_size, args.fim)
    if args.max_chars < 1 or args.doc_cap < 1:
        raise UserError("--max-chars and --doc-cap must be positive")
    split_files("train")  # fail before training if there is no data

    seen = {"chars": 0, "docs": 0}

    def texts():
        for batch in parquets_iter_batched("train"):
            for doc in batch:
                doc = doc[:args.doc_cap]
                seen["chars"] += len(doc)
                seen["docs"] += 1
                yield doc
                if seen["chars"] >= args.max_chars:
                    return

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(texts(), args.vocab_size, fim=args.fim)
    train_time = time.time() - t0
    if seen["chars"] == 0:
        raise UserError("the train shards hold no text: rebuild them with python -m nanochat.dataset")
    vocab_size = tokenizer.get_vocab_size()
    print(f"trained on {seen['chars']:,} chars ({seen['docs']:,} docs) in {train_time:.2f}s "
          f"({seen['chars'] / max(train_time, 1e-9) / 1e6:.1f}M chars/s)")
    if vocab_size < args.vocab_size:
        print(f"note: the text only supports {vocab_size - len(special_tokens(args.fim))} merges, so the vocabulary is "
              f"{vocab_size}, not {args.vocab_size}: train on more text for the full size")
    if tokenizer.decode(tokenizer.encode(ROUND_TRIP_TEXT)) != ROUND_TRIP_TEXT:
        raise RuntimeError("tokenizer round trip failed")

    import torch  # only for saving token_bytes.pt
    out_dir = tokenizer_dir()
    tokenizer_path = tokenizer.save(out_dir)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int32)
    token_bytes_path = os.path.join(out_dir, "token_bytes.pt")
    torch.save(token_bytes, token_bytes_path + ".tmp")
    os.replace(token_bytes_path + ".tmp", token_bytes_path)
    nonzero = token_bytes[token_bytes > 0].float()
    print(f"saved {tokenizer_path} and {token_bytes_path}; token bytes min {int(nonzero.min())} "
          f"max {int(nonzero.max())} mean {nonzero.mean():.2f}")
    print_result("tok_train", vocab_size=vocab_size, fim=tokenizer.has_fim(), train_chars=seen["chars"], train_docs=seen["docs"],
                 train_seconds=round(train_time, 3), chars_per_second=round(seen["chars"] / max(train_time, 1e-9)),
                 token_bytes_mean=round(nonzero.mean().item(), 4), tokenizer=tokenizer_path, token_bytes=token_bytes_path)


if __name__ == "__main__":
    run_cli(main)
