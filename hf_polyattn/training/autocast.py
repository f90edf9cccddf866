"""What mixed-precision training leaves behind, undone.

With `bf16=True` accelerate wraps the model's `forward` in autocast when a `Trainer` prepares it,
and the wrapper stays after `train()` returns: a model evaluated, calibrated or compared after
training would then run its matrix products in bf16 without saying so (a polynomial form's
fidelity measured that way fell from 99.8 % to 98.4 % top-1 agreement on an H200).
"""

from transformers import Trainer


class UnwrapsAfterTraining(Trainer):
    """A `Trainer` whose `train()` hands the model back with its own forward (in its own dtype)."""

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
