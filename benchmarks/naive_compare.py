"""Naive baseline: load each tensor pair whole, cast to float32, cosine. (What a first script does.)"""

import sys

import torch
from safetensors import safe_open


def main(a: str, b: str) -> None:
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        for name in fa.keys():
            x = fa.get_tensor(name).float().flatten()
            y = fb.get_tensor(name).float().flatten()
            torch.nn.functional.cosine_similarity(x, y, dim=0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
