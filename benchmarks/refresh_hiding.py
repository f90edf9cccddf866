"""How well refresh masks hide the activations the client sees, site by site (embedded model).

    python benchmarks/refresh_hiding.py                     # the 6 tokens of "ROMEO."

A refresh shows the client `x + r` with `r` uniform in [-R, R] (`CKKSParameters.mask_bound`,
from the OS CSPRNG): each value is within statistical distance `|x| / R` of uniform. This script
runs the embedded model's encrypted steps in-process with a refresher that also records the
largest `|x|` at each site of the circuit (it decrypts the unmasked value: a measurement that
needs the secret key, so it lives here and never in the server), and states the hiding per site.
The mask costs headroom, not precision: the client decrypts `x + r` with CKKS's absolute error
whatever `R` is and the server subtracts `r` exactly, so `R` is the largest the ring holds (the
client refuses `|x + r| > 2R`, and `2R` is half of what a circuit may compute on the ring).
Writes Markdown to --results.
"""

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from hf_polyattn.assets import load_default_model
from hf_polyattn.ckks import CKKSClient, CKKSServer, ClientRoundTrip
from report import command_line, write_results


class RecordingRoundTrip(ClientRoundTrip):
    """`ClientRoundTrip` that also records the largest |x| it refreshes per site (benchmark only)."""

    def __init__(self, client):
        super().__init__(client)
        self.largest: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def __call__(self, backend, ct, size, profiler, all_slots=False):
        seen = backend.slots if all_slots else size  # a packed ciphertext: every slot is a value the client sees
        values = self.client.decrypt(self.client.key_id + backend.serialize(ct, seen), bound=np.inf)
        self.largest[profiler.site] = max(self.largest[profiler.site], float(np.abs(values).max()))
        self.count[profiler.site] += 1
        return super().__call__(backend, ct, size, profiler, all_slots)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="ROMEO.")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/refresh_hiding.md"))
    args = parser.parse_args(argv)

    model, tokenizer = load_default_model()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0]
    client = CKKSClient()
    refresher = RecordingRoundTrip(client)
    server = CKKSServer(model, client.public_context(), refresher, max_tokens=len(ids))
    with torch.no_grad():
        for embedding in model.get_input_embeddings()(ids).double().numpy():
            server.step(client.encrypt(embedding))
    bound = refresher.mask_bound
    rows = ["| site (scope / step) | refreshes | largest \\|x\\| | hiding per value (\\|x\\| / R) | bits |", "|---|---|---|---|---|"]
    for site in sorted(refresher.largest, key=lambda name: -refresher.largest[name]):
        largest = refresher.largest[site]
        rows.append(f"| {site} | {refresher.count[site]} | {largest:.3g} | {largest / bound:.1e} | "
                    f"{math.log2(bound / largest):.1f} |")
    worst = max(refresher.largest.values())
    text = (
        "# Refresh hiding per site (embedded default model)\n\n"
        f"Command: `{command_line(__file__, argv)}`. {len(ids)} encrypted steps (`{args.prompt}`), N=8192, "
        f"R = {bound:.0f} (2^{math.log2(bound):.0f}, `CKKSParameters.mask_bound`: the client refuses |x + r| > 2R = "
        f"{2 * bound:.0f}, half of the {2 * client.params.value_bound:.0f} the last modulus holds). "
        f"{sum(refresher.count.values())} refreshes. Each value the client sees is within statistical distance "
        "|x| / R of uniform; the worst site sets the session's guarantee per value (distances add up over values).\n\n"
        + "\n".join(rows)
        + f"\n\nWorst site: {worst:.3g} → {worst / bound:.1e} per value ({math.log2(bound / worst):.1f} bits). "
        "A larger R costs no precision (the client decrypts x + r with CKKS's absolute error whatever R is, and "
        "the server subtracts r exactly) but headroom: on this ring R could at most double before 2R reaches what "
        "a circuit may compute, one more bit at every site.\n"
    )
    write_results(args.results, text)  # it prints them too


if __name__ == "__main__":
    main()
