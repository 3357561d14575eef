"""
The bookkeeping every training loop shares (base_train, mid_train, chat_sft): the train loss as a debiased moving
average, the time spent in steps, the best val bpb, the curves for the report card, and Python's garbage collector.
"""

import gc
import math

from nanochat.common import print0


class Progress:
    def __init__(self, wandb_run, num_steps=None, state=None, beta=0.9):
        # the part that must survive a resume (base_train saves it in the checkpoint's meta)
        self.state = state or {"min_val_bpb": math.inf, "smooth_train_loss": 0.0, "total_training_time": 0.0}
        self.wandb_run, self.num_steps, self.beta = wandb_run, num_steps, beta
        self.curve = {"train_loss": [], "val_bpb": []}  # for the report card's picture, ~200 points of train loss
        self.smooth_loss, self.gc_frozen = None, False

    def val_bpb(self, step, bpb, tokens):
        self.state["min_val_bpb"] = min(self.state["min_val_bpb"], bpb)
        self.curve["val_bpb"].append((step, round(bpb, 5)))
        print0(f"step {step:05d} | val bpb: {bpb:.6f} ({tokens:,} tokens)")
        self.wandb_run.log({"step": step, "val/bpb": bpb})

    def train_step(self, step, loss, seconds):
        """After step `step` (counting from 1) ran with this loss: returns the smoothed, debiased loss."""
        state = self.state
        state["smooth_train_loss"] = self.beta * state["smooth_train_loss"] + (1 - self.beta) * loss
        self.smooth_loss = state["smooth_train_loss"] / (1 - self.beta ** step)
        if step > 10:
            state["total_training_time"] += seconds  # the first steps include compilation: left out
        if not self.num_steps or step % max(1, self.num_steps // 200) == 0:
            self.curve["train_loss"].append((step, round(self.smooth_loss, 5)))
        # Python's GC costs ~500 ms pauses once the heap is big: after this run's first step (a resumed run starts
        # past step 1) collect once, freeze what exists and switch it off; then collect every 5000 steps
        if not self.gc_frozen:
            gc.collect()
            gc.freeze()
            gc.disable()
            self.gc_frozen = True
        elif step % 5000 == 0:
            gc.collect()
        return self.smooth_loss

    def close(self):
        """Hand everything back to the collector, so that shutdown finds no leaked objects."""
        gc.unfreeze()
        gc.enable()
        gc.collect()
