"""Training speed of aeplat's Trainer against a bare PyTorch loop of the same model.

A trial (aeplat.platform.trainable.run_trial) calls Trainer.train_epoch and then
Trainer.evaluate on the validation split once per epoch. This script runs those two calls
next to a bare loop: torch.randperm, forward, MSE plus the model's extra losses, backward and
an Adam step, then a validation pass of inference_mode forward, mean squared error and
sklearn's roc_auc_score. Both use the same model from aeplat.trainers.build_model, the same
in-memory arrays, batch size and torch threads. They are interleaved epoch by epoch, Trainer
first, in one process. Each ratio is bare time ÷ aeplat time of the same repetition, which equals aeplat
images/s ÷ bare images/s.

    .venv/bin/python bench/trial_efficiency.py --data-dir ../shared/data/brats --repeats 25
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from aeplat.platform.search import prepare_splits
from aeplat.platform.settings import SearchSettings
from aeplat.trainers import Trainer, TrainingConfig, build_model
from aeplat.trainers.scoring import image_scores, reconstruction_error_map
from perf_common import DEFAULT_DATA_DIR, load_average, machine_text, spread


@dataclass(frozen=True)
class Repetition:
    """Seconds of one interleaved repetition: aeplat's two calls, then the bare loop and validation."""

    train_epoch: float
    evaluate: float
    bare_train: float
    bare_validation: float


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of BraTS cases (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="slice cache folder (default: aeplat's default cache)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--max-train-images", type=int, default=None, help="train on at most this many normal slices (default: all)")
    parser.add_argument("--model", default="ae", help="model name of aeplat.trainers (default: %(default)s)")
    parser.add_argument("--latent-dim", type=int, default=16, help="latent size d (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, as a trial with --cpus-per-trial THREADS gets (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions before the timed ones (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repetitions, each one epoch of both loops (default: %(default)s)")
    return parser.parse_args(argv)


def bare_train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
    """Train one epoch with no bookkeeping. Like Trainer, it skips a last batch of one image."""
    model.train()
    for index in torch.randperm(data.shape[0], generator=generator).split(batch_size):
        if len(index) < 2:
            continue
        batch = data[index]
        optimizer.zero_grad(set_to_none=True)
        output = model(batch)
        loss = F.mse_loss(output.reconstruction, batch) + sum(output.extra_losses.values(), 0.0)
        loss.backward()
        optimizer.step()


def bare_validation(model: nn.Module, data: torch.Tensor, labels: np.ndarray, batch_size: int = 256) -> float:
    """Return the validation AUC of mean squared reconstruction errors, with no checks."""
    model.eval()
    with torch.inference_mode():
        scores = torch.cat([image_scores(reconstruction_error_map(model, batch)) for batch in data.split(batch_size)])
    return float(roc_auc_score(labels, scores.numpy()))


def timed(function, *args) -> float:  # noqa: ANN001 - any callable and its arguments
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def measure(arguments: argparse.Namespace) -> tuple[list[Repetition], dict[str, int]]:
    settings = SearchSettings(
        dataset="brats",
        data_dir=arguments.data_dir,
        image_size=arguments.image_size,
        max_train_images=arguments.max_train_images,
        cache_dir=arguments.cache_dir,
    )
    splits, _ = prepare_splits(settings)
    train, validation = splits.train, splits.validation
    sizes = {"train": len(train), "validation": len(validation)}

    torch.set_num_threads(arguments.threads)
    config = TrainingConfig(model=arguments.model, latent_dim=arguments.latent_dim, batch_size=arguments.batch_size)
    trainer = Trainer(config, image_size=arguments.image_size, device=torch.device("cpu"))

    torch.manual_seed(config.seed)
    model = build_model(config, arguments.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    train_tensor = torch.from_numpy(np.ascontiguousarray(train.images, dtype=np.float32))
    validation_tensor = torch.from_numpy(np.ascontiguousarray(validation.images, dtype=np.float32))

    repetitions = []
    for number in range(arguments.warmup + arguments.repeats):
        repetition = Repetition(
            train_epoch=timed(trainer.train_epoch, train.images),
            evaluate=timed(trainer.evaluate, validation.images, validation.labels),
            bare_train=timed(bare_train_epoch, model, optimizer, train_tensor, config.batch_size, generator),
            bare_validation=timed(bare_validation, model, validation_tensor, validation.labels),
        )
        if number >= arguments.warmup:
            repetitions.append(repetition)
            print(
                f"repetition {len(repetitions)}: train_epoch {repetition.train_epoch:.3f} s, evaluate {repetition.evaluate:.3f} s, "
                f"bare train {repetition.bare_train:.3f} s, bare validation {repetition.bare_validation:.3f} s",
                flush=True,
            )
    return repetitions, sizes


def report(arguments: argparse.Namespace, repetitions: list[Repetition], sizes: dict[str, int], load_before: str) -> str:
    train_ratio = spread(r.bare_train / r.train_epoch for r in repetitions)
    epoch_ratio = spread((r.bare_train + r.bare_validation) / (r.train_epoch + r.evaluate) for r in repetitions)
    evaluate_ratio = spread(r.bare_validation / r.evaluate for r in repetitions)
    validation_share = spread(r.evaluate / (r.train_epoch + r.evaluate) for r in repetitions)
    aeplat_speed = spread(sizes["train"] / r.train_epoch for r in repetitions)
    bare_speed = spread(sizes["train"] / r.bare_train for r in repetitions)
    trial_speed = spread(sizes["train"] / (r.train_epoch + r.evaluate) for r in repetitions)

    lines = [
        "| measure | median (quartiles; min to max; n) |",
        "| --- | --- |",
        f"| train_epoch ÷ bare training loop, images/s ratio | {train_ratio.format(3)} |",
        f"| train_epoch + evaluate ÷ bare training + bare validation | {epoch_ratio.format(3)} |",
        f"| evaluate ÷ bare validation | {evaluate_ratio.format(3)} |",
        f"| share of a trial epoch spent in evaluate | {validation_share.format(3)} |",
        f"| aeplat train_epoch, training images/s | {aeplat_speed.format(0)} |",
        f"| bare training loop, training images/s | {bare_speed.format(0)} |",
        f"| trial epoch (train_epoch + evaluate), training images/s | {trial_speed.format(0)} |",
    ]
    setup = (
        f"{sizes['train']} training and {sizes['validation']} validation slices, {arguments.image_size}×{arguments.image_size}, "
        f"model {arguments.model}, d = {arguments.latent_dim}, batch {arguments.batch_size}, {arguments.threads} torch thread(s), "
        f"{arguments.warmup} warm-up and {arguments.repeats} timed repetitions; {machine_text()}; "
        f"load average before {load_before}, after {load_average()}"
    )
    return setup + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    load_before = load_average()
    repetitions, sizes = measure(arguments)
    print()
    print(report(arguments, repetitions, sizes, load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
