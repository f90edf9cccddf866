"""Softmax checkpoints → PolyAttn: weight maps per source family (and their inverse), offline checkpoint loading."""
