"""From text and softmax checkpoints to trained PolyAttn models."""
