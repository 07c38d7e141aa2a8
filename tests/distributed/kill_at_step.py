"""`KILL_AT_STEP=N accelerate launch ... -m tests.distributed.kill_at_step STAGE --config ...`: run finetune.STAGE and
SIGKILL every rank in the middle of optimizer step N (after its backward, before the update), as a crash or a
preempted job would; the resume tests relaunch the stage from the last checkpoint. Rank 1 is also a second late with
its part of each checkpoint (its RNG state), as a rank on a busy node can be. Test-only: the stage is patched here,
not in finetune/."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time

from transformers import Trainer, TrainerCallback

import finetune.stage as shared


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def save_rng_state_late(save_rng_state):
    def late(self, output_dir: str) -> None:
        if self.args.process_index == 1:
            time.sleep(1)
        save_rng_state(self, output_dir)

    return late


def main() -> None:
    step = int(os.environ["KILL_AT_STEP"])
    Trainer._save_rng_state = save_rng_state_late(Trainer._save_rng_state)
    train_and_save = shared.train_and_save

    def train_and_kill(trainer, config) -> None:
        trainer.add_callback(KillAtStep(step))
        train_and_save(trainer, config)

    shared.train_and_save = train_and_kill  # every stage trains through finetune.stage.train_and_save
    importlib.import_module(f"finetune.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
