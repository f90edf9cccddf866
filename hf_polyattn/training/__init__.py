"""What changes weights: pretraining, data and corpora, calibration from text, distillation, attention transfer, the range loss."""
