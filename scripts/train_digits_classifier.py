"""Train the embedded digits classifier whose features FID/KID use, and write it into the package.

Deterministic: one seed, one thread, every random draw from one CPU generator. Takes a few seconds.

    python scripts/train_digits_classifier.py            # writes ddsm_search/metrics/weights/digits_cnn.*
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save

from ddsm_search.data import load_dataset
from ddsm_search.io import sha256_file, write_atomic, write_json_atomic
from ddsm_search.metrics.digits_cnn import FEATURES, WEIGHTS_PATH, DigitsCNN


def shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return the images each moved by up to one pixel in x and y (zero fill): the only augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # -1 is the background colour
    dy, dx = torch.randint(0, 3, (2, n, 1), generator=generator)
    rows, cols = dy + torch.arange(8), dx + torch.arange(8)  # (n, 8) each
    return padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the fraction of images classified correctly."""
    model.eval()
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    """Train, report test accuracy, write weights (safetensors) and a JSON beside them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="weights file (.safetensors); the JSON goes beside it")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one thread: the same weights bit for bit on every run
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    x, y = train.to_float(), train.labels
    xt, yt = test.to_float(), test.labels
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for idx in order.split(args.batch_size):
            loss = F.cross_entropy(model(shifted(x[idx], generator)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - started
    train_acc, test_acc = accuracy(model, x, y), accuracy(model, xt, yt)
    with torch.inference_mode():  # feature constants: centred, mean squared norm per dimension 1
        raw = model.body(x)
        model.feature_shift.copy_(raw.mean(0))
        model.feature_scale.copy_((raw - raw.mean(0)).pow(2).mean().sqrt())
    print(f"trained in {seconds:.1f} s: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}")

    out = Path(args.out)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(out, lambda tmp: tmp.write_bytes(save(state)))  # bytes: save_file would reset the mode to 0600
    write_json_atomic(out.with_suffix(".json"), {
        "model": "DigitsCNN", "features": FEATURES, "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4), "test_images": len(xt), "train_images": len(x),
        "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "command": "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "sha256": sha256_file(out),
    })


if __name__ == "__main__":
    main()
