"""The Ray Tune function that runs one trial: train on normal images, report validation AUC."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
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


@dataclass(frozen=True)
class TrialData:
    """What every trial of a search shares. Ray puts it in the object store once per search."""

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


def training_config(config: dict[str, Any], space: SearchSpace, seed: int) -> TrainingConfig:
    """Build the TrainingConfig of a trial from its Tune config."""
    values = space.training_values(config)
    values["seed"] = seed
    return TrainingConfig.from_mapping(values)


def trial_device(data: TrialData) -> torch.device:
    if data.device != "auto":
        return resolve_device(data.device)
    return resolve_device("cuda" if data.gpus_per_trial > 0 else "cpu")


def run_trial(config: dict[str, Any], data: TrialData) -> None:
    """Train one configuration and report validation metrics after every epoch.

    A checkpoint is saved whenever the validation AUC improves. It holds the full trainer
    state (to resume) and the weights of the best epoch (to register).
    """
    torch.set_num_threads(max(1, int(data.cpus_per_trial)))
    seed_everything(data.seed)
    training = training_config(config, data.space, data.seed)
    trainer = Trainer(training, image_size=data.image_size, device=trial_device(data))
    best = {"best_val_auc": float("-inf"), "best_epoch": 0}
    best_weights = copy.deepcopy(trainer.model.state_dict())

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        best, best_weights = _restore(trainer, checkpoint)
        logger.info("Trial resumed from epoch %d (best validation AUC %.4f).", trainer.epoch, best["best_val_auc"])

    while trainer.epoch < data.epochs:
        train_metrics = trainer.train_epoch(data.train_images)

        validation_metrics = trainer.evaluate(data.validation_images, data.validation_labels)

        improved = validation_metrics["val_auc"] > best["best_val_auc"]
        if improved:
            best = {"best_val_auc": validation_metrics["val_auc"], "best_epoch": trainer.epoch}
            best_weights = copy.deepcopy(trainer.model.state_dict())

        metrics = {"epoch": trainer.epoch, **train_metrics, **validation_metrics, **best}
        if improved or trainer.epoch == data.epochs:
            _report_with_checkpoint(metrics, trainer, training, best_weights)
        else:
            tune.report(metrics)


def _report_with_checkpoint(
    metrics: dict[str, Any], trainer: Trainer, training: TrainingConfig, best_weights: dict[str, torch.Tensor]
) -> None:
    with tempfile.TemporaryDirectory(prefix="aeplat-checkpoint-") as folder:
        folder_path = Path(folder)
        torch.save(trainer.state_dict(), folder_path / TRAINER_STATE_FILE)
        torch.save(best_weights, folder_path / BEST_MODEL_FILE)
        summary = {**{k: metrics[k] for k in ("best_val_auc", "best_epoch")}, "training": training.__dict__}
        (folder_path / SUMMARY_FILE).write_text(json.dumps(summary, default=str), encoding="utf-8")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _restore(trainer: Trainer, checkpoint: tune.Checkpoint) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with checkpoint.as_directory() as folder:
        folder_path = Path(folder)
        trainer.load_state_dict(torch.load(folder_path / TRAINER_STATE_FILE, weights_only=False))
        best_weights = torch.load(folder_path / BEST_MODEL_FILE, weights_only=True)
        summary = json.loads((folder_path / SUMMARY_FILE).read_text(encoding="utf-8"))
    return {"best_val_auc": summary["best_val_auc"], "best_epoch": summary["best_epoch"]}, best_weights


def load_best_weights(checkpoint: tune.Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the best epoch's model weights and the checkpoint summary of a finished trial."""
    with checkpoint.as_directory() as folder:
        folder_path = Path(folder)
        weights = torch.load(folder_path / BEST_MODEL_FILE, weights_only=True)
        summary = json.loads((folder_path / SUMMARY_FILE).read_text(encoding="utf-8"))
    return weights, summary
