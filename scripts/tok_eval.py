"""
Compression of our tokenizer (bytes per token, higher is better) on built-in samples and on the train/val shards,
next to GPT-2's and GPT-4's tokenizers when their encodings can be loaded (they download once; offline we skip them).

    python -m scripts.tok_eval
"""

import socket

from nanochat.common import UserError, print_result, run_cli, Flags
from nanochat.dataset import parquets_iter_batched, split_files
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

SAMPLES = {
    "news": """Officials in the coastal town of Marren Bay said on Tuesday that the new sea wall, delayed for almost two
years by supply problems and a dispute over its cost, would open to the public next month. The project, budgeted at
$41.7 million, is meant to protect roughly 3,200 homes from the storm surges that flooded the harbour district in 2019
and again in 2023. "We are not pretending this solves everything," the mayor told reporters, adding that the council
would publish a second-phase plan for the northern shore by the end of the year.""",
    "korean": """서울의 작은 책방들은 요즘 새로운 방식으로 독자들을 만나고 있다. 주말마다 작가와의 대화를 열고,
동네 주민들이 직접 고른 책으로 추천 코너를 꾸민다. 한 책방 주인은 "사람들이 책을 사러 오는 게 아니라 이야기를
나누러 온다"고 말했다. 온라인 서점보다 가격은 조금 비싸지만, 단골손님은 꾸준히 늘고 있다.""",
    "code": '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals and return them sorted."""
    intervals = sorted(intervals, key=lambda x: x[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged

if __name__ == "__main__":
    print(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))  # [[1, 6], [8, 10], [15, 18]]
''',
    "math": r"""Let $f:\mathbb{R}\to\mathbb{R}$ be differentiable with $f'(x) = 2x\,f(x)$ and $f(0)=1$.
Separating variables gives $\int \frac{df}{f} = \int 2x\,dx$, so $\ln|f(x)| = x^2 + C$ and hence
\begin{equation}
  f(x) = e^{x^2}, \qquad \int_0^1 x\,f(x)\,dx = \tfrac{1}{2}\left(e - 1\right) \approx 0.859.
\end{equation}""",
    "science": """Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent
reactions, photosystem II splits water (2H2O -> 4H+ + 4e- + O2), and the electrons pass along the thylakoid membrane,
pumping protons that drive ATP synthase. The Calvin cycle then fixes CO2 using the enzyme RuBisCO, which, despite
catalysing only about 3 to 10 reactions per second, is probably the most abundant protein on Earth.""",
}


def load_reference_tokenizers():
    """GPT-2 and GPT-4 encodings; tiktoken downloads them once, so offline they may be missing."""
    found, missing = {}, []
    socket.setdefaulttimeout(10)  # tiktoken's download sets no timeout: never hang on a dead network
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            found[label] = RustBPETokenizer.from_pretrained(name)
        except Exception as e:
            missing.append(f"{label} ({type(e).__name__})")
    socket.setdefaulttimeout(None)
    if missing:
        print(f"comparison tokenizers unavailable (offline?): {', '.join(missing)}; showing ours alone")
    return found


def shard_samples():
    """The first row group of each split; no shards yet is fine (skipped), a damaged shard is an error."""
    texts = {}
    for split in ("train", "val"):
        try:
            split_files(split)
        except UserError as e:
            print(f"no {split} data to evaluate on ({e}); skipping it")
            continue
        batch = next(parquets_iter_batched(split), [])
        if batch:
            texts[split] = "\n".join(batch)
        else:
            print(f"no {split} data to evaluate on (its shards hold no text); skipping it")
    return texts


def main(argv=None):
    Flags(description="Evaluate the tokenizer's compression ratio.").parse_args(argv)
    ours = get_tokenizer()
    texts = {**SAMPLES, **shard_samples()}  # before the reference tokenizers' downloads: a damaged shard fails fast
    tokenizers = {"ours": ours, **load_reference_tokenizers()}
    ratios = {name: {} for name in tokenizers}
    header = f"{'text':<10} {'bytes':>9}" + "".join(f" | {name + ' tokens':>12} {'ratio':>6}" for name in tokenizers)
    print(header)
    print("-" * len(header))
    for label, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        line = f"{label:<10} {nbytes:>9,}"
        for name, tok in tokenizers.items():
            ntokens = len(tok.encode(text))
            ratios[name][label] = round(nbytes / ntokens, 4)
            line += f" | {ntokens:>12,} {nbytes / ntokens:>6.2f}"
        print(line)
    print_result("tok_eval", vocab_size=tokenizers["ours"].get_vocab_size(), bytes_per_token=ratios)


if __name__ == "__main__":
    run_cli(main)
