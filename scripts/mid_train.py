"""
Midtraining: between pretraining and SFT, teach the conversation format, multiple choice, tool use (the calculator
in GSM8K and spelling problems) and who the model is, on a large mixture: SmolTalk, MMLU auxiliary_train, GSM8K,
the identity conversations (twice), SimpleSpelling and SpellingBee. Writes mid_checkpoints/. The loop is SFT's.

    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=mid1
    python -m scripts.mid_train --data=offline --num-iterations=200
"""

from nanochat.common import run_cli
from scripts.chat_sft import main

if __name__ == "__main__":
    run_cli(lambda: main(stage="mid"))
