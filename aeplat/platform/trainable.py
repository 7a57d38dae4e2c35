"""The Ray Tune function that runs one trial: train on normal images, report validation AUC.

Also the driver-side step that turns a trial's best checkpoint into artifact files
(``write_trial_artifacts``). Trials never write to MLflow.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from aeplat.search_spaces import SearchSpace
from aeplat.trainers import Trainer, TrainingConfig, resolve_device, seed_everything

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer.pt"
BEST_MODEL_FILE = "best_model.pt"
SUMMARY_FILE = "summary.json"
VALIDATION_SCORES_FILE = "validation_scores.npy"
TRAINING_CONFIG_FILE = "training_config.json"

# Staging folders of checkpoints in the system temporary folder, named by the trial process's PID.
CHECKPOINT_STAGING_PREFIX = "aeplat-checkpoint-"

# Summary key of a checkpoint whose best weights are the model weights of one trainer state in
# trainer.pt (the index of that state), saved without a separate best_model.pt.
BEST_WEIGHTS_STATE_KEY = "best_weights_state"

DEFAULT_CHECKPOINT_INTERVAL_S = 30.0


def scheduler_stop_epochs(epochs: int, grace_period: int, reduction_factor: float) -> tuple[int, ...]:
    """Return the epochs after which ASHA (one bracket) may stop a trial, the last epoch included.

    The rungs lie at grace_period * reduction_factor ** k, for every k that keeps them within
    ``epochs``. Ray Tune 2.60's AsyncHyperBandScheduler decides at the first result whose
    training iteration reaches a rung, and a trial reports once per epoch, so the decision falls
    on the epoch ceil(rung). A test compares these epochs with the scheduler's own rungs.
    """
    rungs = int(math.log(epochs / grace_period) / math.log(reduction_factor) + 1)
    stops = {math.ceil(grace_period * reduction_factor**k) for k in range(rungs)}
    return tuple(sorted(epoch for epoch in stops | {epochs} if epoch <= epochs))


@dataclass(frozen=True)
class CheckpointSchedule:
    """The epochs after which a trial saves a checkpoint.

    A checkpoint is due after the last epoch. It is also due after an epoch where the scheduler
    may stop the trial, if the best validation AUC changed since the previous checkpoint, so that
    a stopped trial's checkpoint contains its best weights. Otherwise one is due once
    ``interval_s`` seconds have passed since the previous checkpoint (0 saves one after every
    epoch), which bounds the training that a trial restored after a failure repeats.
    """

    last_epoch: int
    stop_epochs: tuple[int, ...] = ()
    interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S

    def due(self, epoch: int, best_changed: bool, seconds_since_previous: float) -> bool:
        if epoch >= self.last_epoch:
            return True
        if best_changed and epoch in self.stop_epochs:
            return True
        return seconds_since_previous >= self.interval_s


@dataclass(frozen=True)
class TrialData:
    """Arrays and settings shared by every trial of a search. Ray puts them in the object store once."""

    train_images: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    image_size: int
    epochs: int
    seed: int
    cpus_per_trial: float
    gpus_per_trial: float
    device: str
    space: SearchSpace
    repeats: int = 1
    checkpoints: CheckpointSchedule | None = None

    def checkpoint_schedule(self) -> CheckpointSchedule:
        return self.checkpoints or CheckpointSchedule(last_epoch=self.epochs)


def training_config(config: dict[str, Any], space: SearchSpace, seed: int) -> TrainingConfig:
    """Build the TrainingConfig of a trial from its Tune config."""
    values = space.training_values(config)
    values["seed"] = seed
    return TrainingConfig.from_mapping(values)


def trial_device(data: TrialData) -> torch.device:
    if data.device != "auto":
        return resolve_device(data.device)
    return resolve_device("cuda" if data.gpus_per_trial > 0 else "cpu")


def limit_gpu_memory(device: torch.device, gpus_per_trial: float) -> None:
    """Cap this process's share of the GPU's memory at gpus_per_trial when trials share a GPU.

    Ray gives each trial a fraction of a GPU but does not divide its memory. With the cap, a
    trial that outgrows its share fails with CUDA's out-of-memory error, and the trials next to
    it on the same GPU go on.
    """
    if device.type != "cuda" or not 0 < gpus_per_trial < 1:
        return

    # NOTE: this branch has run only against a stub of torch.cuda, because no GPU was available.
    # The call needs a device index, and a plain "cuda" means the current device.
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_per_process_memory_fraction(float(gpus_per_trial), index)
    logger.debug("GPU memory of this trial process capped at %.0f %% of %s.", 100 * gpus_per_trial, device)


@functools.cache
def _malloc_trim() -> Any:
    """Return glibc's malloc_trim function, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    return getattr(library, "malloc_trim", None)


def release_freed_memory() -> bool:
    """Hand memory that earlier trials of this process freed back to the operating system.

    Ray Tune runs each trial of a reused process in a new thread, and glibc keeps the memory a
    thread frees in that thread's malloc arena. Without a trim, the resident memory of a process
    that ran 16 trials one after another grew from 624 to 1,163 MiB (bench/memory_use.py
    --no-trim). Returns whether it trimmed.
    """
    trim = _malloc_trim()
    if trim is None:
        return False

    trim(0)
    return True


def run_trial(config: dict[str, Any], data: TrialData) -> None:
    """Train one configuration with ``data.repeats`` seeds and report validation metrics after every epoch.

    Seeds are data.seed, data.seed + 1, and so on, and every epoch trains each model once.
    ``val_auc`` and the other shared keys are means over the seeds, ``val_auc_std`` is the
    population standard deviation of the AUC over the seeds (0.0 for one seed), and
    ``seed_<seed>/<key>`` contains each seed's own value. ``best_val_auc`` is the best mean
    AUC so far. Checkpoints follow ``data.checkpoint_schedule()``. Each contains every
    trainer's state (to resume), and the weights and validation scores of the seed with the
    highest AUC at the best epoch (to register and plot).
    """
    torch.set_num_threads(max(1, int(data.cpus_per_trial)))
    release_freed_memory()
    remove_orphaned_staging_folders()
    seed_everything(data.seed)
    device = trial_device(data)
    limit_gpu_memory(device, data.gpus_per_trial)
    schedule = data.checkpoint_schedule()
    seeds = [data.seed + offset for offset in range(data.repeats)]
    trainers = [Trainer(training_config(config, data.space, seed), image_size=data.image_size, device=device) for seed in seeds]
    best = {"best_val_auc": float("-inf"), "best_epoch": 0, "best_seed": seeds[0]}
    best_weights = copy.deepcopy(trainers[0].model.state_dict())
    best_scores = None

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        best, best_weights, best_scores = _restore(trainers, checkpoint)
        logger.info("Trial resumed from epoch %d (best validation AUC %.4f).", trainers[0].epoch, best["best_val_auc"])

    best_changed = False
    previous_checkpoint = time.monotonic()
    while trainers[0].epoch < data.epochs:
        evaluated = [_train_and_evaluate(trainer, data) for trainer in trainers]
        per_seed = [seed_metrics for seed_metrics, _ in evaluated]
        metrics = _combine_seeds(per_seed, seeds)
        epoch = trainers[0].epoch

        if metrics["val_auc"] > best["best_val_auc"]:
            winner = max(range(len(seeds)), key=lambda index: per_seed[index]["val_auc"])
            best = {"best_val_auc": metrics["val_auc"], "best_epoch": epoch, "best_seed": seeds[winner]}
            best_weights = copy.deepcopy(trainers[winner].model.state_dict())
            best_scores = evaluated[winner][1]
            best_changed = True

        metrics = {"epoch": epoch, **metrics, **best}
        if schedule.due(epoch, best_changed, time.monotonic() - previous_checkpoint):
            _report_with_checkpoint(metrics, trainers, best_weights, best_scores)
            best_changed = False
            previous_checkpoint = time.monotonic()
        else:
            tune.report(metrics)


def _train_and_evaluate(trainer: Trainer, data: TrialData) -> tuple[dict[str, float], np.ndarray]:
    train_metrics = trainer.train_epoch(data.train_images)
    validation_metrics, scores = trainer.evaluate_with_scores(data.validation_images, data.validation_labels)
    return {**train_metrics, **validation_metrics}, scores


def _combine_seeds(per_seed: list[dict[str, float]], seeds: list[int]) -> dict[str, float]:
    """Return the mean of every key over the seeds, val_auc_std, and each seed's values as seed_<seed>/<key>."""
    combined = {key: float(np.mean([values[key] for values in per_seed])) for key in per_seed[0]}
    combined["val_auc_std"] = float(np.std([values["val_auc"] for values in per_seed]))

    if len(seeds) > 1:
        for seed, values in zip(seeds, per_seed):
            combined.update({f"seed_{seed}/{key}": value for key, value in values.items()})
    return combined


def _report_with_checkpoint(
    metrics: dict[str, Any], trainers: list[Trainer], best_weights: dict[str, torch.Tensor], best_scores: np.ndarray | None
) -> None:
    # The trial's own folder is no place for the staging folder, because Tune uploads that folder
    # while the trial runs. When Tune ends the trial's process inside tune.report, the folder
    # (28 to 38 MB at hidden width 1024) stays behind until remove_orphaned_staging_folders.
    with tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_STAGING_PREFIX}{os.getpid()}-") as folder:
        folder_path = Path(folder)
        best_seed = metrics["best_seed"]
        summary = {
            **{key: metrics[key] for key in ("best_val_auc", "best_epoch", "best_seed")},
            "training": dataclasses.asdict(dataclasses.replace(trainers[0].config, seed=best_seed)),
        }
        torch.save([trainer.state_dict() for trainer in trainers], folder_path / TRAINER_STATE_FILE)

        # At the best epoch itself, the best weights are those of the winning seed's trainer state.
        if metrics["best_epoch"] == metrics["epoch"]:
            summary[BEST_WEIGHTS_STATE_KEY] = [trainer.config.seed for trainer in trainers].index(best_seed)
        else:
            torch.save(best_weights, folder_path / BEST_MODEL_FILE)

        if best_scores is not None:
            np.save(folder_path / VALIDATION_SCORES_FILE, best_scores)
        (folder_path / SUMMARY_FILE).write_text(json.dumps(summary, default=str), encoding="utf-8")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def remove_orphaned_staging_folders(temporary_folder: Path | None = None) -> int:
    """Delete the checkpoint staging folders of trial processes that no longer run; return how many.

    A folder whose name carries no PID, or the PID of a running process, is left alone.
    """
    removed = 0
    folder = Path(temporary_folder or tempfile.gettempdir())
    for path in folder.glob(f"{CHECKPOINT_STAGING_PREFIX}*"):
        pid = path.name.removeprefix(CHECKPOINT_STAGING_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1

    if removed:
        logger.debug("Removed %d checkpoint staging folders of ended trial processes from %s.", removed, folder)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _restore(
    trainers: list[Trainer], checkpoint: tune.Checkpoint
) -> tuple[dict[str, Any], dict[str, torch.Tensor], np.ndarray | None]:
    with checkpoint.as_directory() as folder:
        folder_path = Path(folder)
        states = torch.load(folder_path / TRAINER_STATE_FILE, weights_only=False)
        if len(states) != len(trainers):
            raise ValueError(
                f"the checkpoint contains {len(states)} trainer states but the trial trains {len(trainers)} seeds. "
                f"Resume with the --repeats of the search that saved it"
            )
        for trainer, state in zip(trainers, states):
            trainer.load_state_dict(state)
        summary = json.loads((folder_path / SUMMARY_FILE).read_text(encoding="utf-8"))
        best_weights = _best_weights(folder_path, summary, states)
        best_scores = _load_scores(folder_path)

    best = {key: summary[key] for key in ("best_val_auc", "best_epoch", "best_seed")}
    return best, best_weights, best_scores


def _best_weights(folder: Path, summary: dict[str, Any], states: list[dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """Return the best weights of a checkpoint folder: best_model.pt, or the model of the trainer state it names."""
    index = summary.get(BEST_WEIGHTS_STATE_KEY)
    if index is None:
        return torch.load(folder / BEST_MODEL_FILE, weights_only=True)

    if states is None:
        states = torch.load(folder / TRAINER_STATE_FILE, weights_only=True)
    return states[index]["model"]


def _load_scores(folder: Path) -> np.ndarray | None:
    path = folder / VALIDATION_SCORES_FILE
    return np.load(path) if path.is_file() else None


def load_best_weights(checkpoint: tune.Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the best epoch's model weights and the checkpoint summary of a finished trial."""
    weights, summary, _ = _load_best(checkpoint)
    return weights, summary


def _load_best(checkpoint: tune.Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any], np.ndarray | None]:
    with checkpoint.as_directory() as folder:
        folder_path = Path(folder)
        summary = json.loads((folder_path / SUMMARY_FILE).read_text(encoding="utf-8"))
        weights = _best_weights(folder_path, summary)
        scores = _load_scores(folder_path)
    return weights, summary, scores


def write_trial_artifacts(checkpoint: tune.Checkpoint, folder: Path, data: TrialData) -> list[Path]:
    """Write a finished trial's artifacts from its latest checkpoint into folder, on the driver.

    The latest checkpoint always contains the best weights so far, also for a trial that ASHA
    stopped early. Writes ``best_model.pt`` (the model's state dict), ``training_config.json``
    (the TrainingConfig with the seed of those weights, the image size, best epoch and
    validation AUC) and the validation plots of ``write_validation_plots``, from the
    validation scores that the trial saved at its best epoch. Returns the paths written.
    """
    folder = Path(folder)
    weights, summary, scores = _load_best(checkpoint)
    training = TrainingConfig.from_mapping(summary["training"])

    # Plots run on the driver's CPU, where the trial's device may not exist.
    trainer = Trainer(training, image_size=data.image_size, device=torch.device("cpu"))
    trainer.model.load_state_dict(weights)

    torch.save(weights, folder / BEST_MODEL_FILE)
    description = {
        "training": dataclasses.asdict(training),
        "image_size": data.image_size,
        "best_epoch": summary["best_epoch"],
        "best_val_auc": summary["best_val_auc"],
    }
    (folder / TRAINING_CONFIG_FILE).write_text(json.dumps(description, indent=2), encoding="utf-8")

    # Trials never plot, so only the driver pays for importing matplotlib.
    from aeplat.trainers.plots import write_validation_plots

    plots = write_validation_plots(trainer, data.validation_images, data.validation_labels, folder, scores=scores)
    return [folder / BEST_MODEL_FILE, folder / TRAINING_CONFIG_FILE, *plots]
