"""A training run in its own process for test_checkpoint: can SIGKILL itself mid-training, or resume."""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import classification_data, sam_args, tiny_bert  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from slsam_hf import SAMTrainer  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--kill_at_step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    cli = parser.parse_args()
    args = sam_args(cli.output_dir, max_steps=8, save_strategy="steps", save_steps=2, sam_mode="lookback")
    callbacks = [KillAt(cli.kill_at_step)] if cli.kill_at_step else []
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data(n=48), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters()},
              os.path.join(cli.output_dir, "final.safetensors"))


if __name__ == "__main__":
    main()
