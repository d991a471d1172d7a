"""The LightningModule behind `train`: loss, metrics, optimizer and schedule, checkpoint metadata.

Batches arrive as uint8 images; `presets.normalize` runs here, on the training device, so
the DataLoader workers only decode and augment. Private: the public surface is `train.run`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgclf import models, presets
from imgclf.checkpoint import make_meta
from imgclf.config import TrainConfig
from imgclf.train import _mix
from imgclf.train import _multilabel as ml

log = logging.getLogger("imgclf.train")

# Share of validation predictions given to one class above which we call it a collapse.
COLLAPSE_SHARE = 0.9


class ImageClassifier(pl.LightningModule):
    def __init__(self, model: nn.Module, config: TrainConfig, class_names: list[str],
                 pre: presets.Preprocessing, class_weights: torch.Tensor | None = None,
                 train_targets: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.class_names = list(class_names)
        self.pre = pre
        self.normalize = presets.normalize(pre)
        n = len(class_names)
        # task: multilabel: sigmoid outputs, BCE or ASL, its own validation metrics (train/_multilabel.py).
        self.multilabel = config.task == "multilabel"
        self.ml_criterion = ml.make_criterion(config, train_targets) if self.multilabel else None
        self.ml_metrics = ml.ValMetrics(n) if self.multilabel else None
        self.criterion = nn.CrossEntropyLoss(weight=class_weights,
                                             label_smoothing=config.loss.label_smoothing)
        # MixUp / CutMix on the normalised batch (None when off); validation never mixes.
        self.mixer = _mix.make_mixer(config.data.augment, n)
        self.train_loss = torchmetrics.MeanMetric()
        self.val_loss = torchmetrics.MeanMetric()
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_f1 = torchmetrics.classification.MulticlassF1Score(n, average="macro")
        # Predictions per class (column sums) reveal a collapse to one class.
        self.val_confusion = torchmetrics.classification.MulticlassConfusionMatrix(n)
        self.ema: AveragedModel | None = None
        if config.trainer.ema:
            # use_buffers: BatchNorm running statistics are averaged along with the weights.
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.trainer.ema_decay),
                                     use_buffers=True)
            # The average is updated by hand, never by gradients; DDP would otherwise wait for them.
            self.ema.requires_grad_(False)
        # Epochs the backbone stays frozen; train sets 0 for a backbone with no pretrained weights.
        self.freeze_epochs = config.model.freeze_backbone_epochs
        self.images_seen = 0
        self.epoch_started = 0.0
        self.train_seconds = 0.0  # training batches only: images/s excludes validation
        self.val_stats: dict[str, float] = {}
        self.collapsed_epochs: list[int] = []
        self.time_budget_s = (config.trainer.max_time_minutes or 0.0) * 60.0

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            self._freeze_bn_statistics()
        return self

    def _freeze_bn_statistics(self) -> None:
        """model.bn_frozen: BatchNorm layers in eval mode while training (their scale and shift still learn).

        Their running statistics then stay the pretrained ones: a few hundred photos in batches of 32,
        heavily augmented, would otherwise replace ImageNet's statistics within an epoch (with momentum
        0.44 at 8 steps an epoch, within a few batches), and the features the head was fitted on move.
        Lightning does not call train() at each epoch (it restores each module's own flag after
        validation), so on_train_epoch_start calls this too.
        """
        if not self.config.model.bn_frozen:
            return
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    # ---- forward and steps ------------------------------------------------------------------
    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        return self._layout(self.normalize(images))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.trainer.channels_last is True:
            return x.contiguous(memory_format=torch.channels_last)
        return models.fast_layout(x) if self.config.trainer.channels_last == "auto" else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._model_input(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        x = self.normalize(images)
        if self.ml_criterion is not None:
            loss = self.ml_criterion(self.model(self._layout(x)), targets)
            self.train_loss.update(loss.detach(), weight=len(targets))
            self.images_seen += len(targets)
            return loss
        if self.mixer is not None:
            x, targets = self.mixer(x, targets)  # soft (N, K) targets when this batch was mixed
        # The criterion's weight and smoothing, for hard and soft targets alike.
        loss = _mix.cross_entropy(self.model(self._layout(x)), targets, self.criterion.weight,
                                  self.criterion.label_smoothing)
        self.train_loss.update(loss.detach(), weight=len(targets))
        self.images_seen += len(targets)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_seconds = time.perf_counter() - self.epoch_started
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        net = self.ema.module if self.ema is not None else self.model
        logits = net(self._model_input(images))
        if self.ml_metrics is not None:
            self.ml_metrics.update(logits, targets)
            return
        self.val_loss.update(nn.functional.cross_entropy(logits, targets), weight=len(targets))
        preds = logits.argmax(1)
        self.val_accuracy.update(preds, targets)
        self.val_f1.update(preds, targets)
        self.val_confusion.update(preds, targets)

    # ---- epoch bookkeeping (metrics.csv is written by a callback from these stats) -----------
    def on_train_epoch_start(self) -> None:
        self._set_backbone_frozen(self.current_epoch < self.freeze_epochs)
        self._freeze_bn_statistics()
        self.images_seen = 0
        self.epoch_started = time.perf_counter()
        self.train_seconds = 0.0

    def finish_train_stats(self) -> dict[str, float]:
        """Train loss, LR and speed of the epoch just finished (call on every rank: it syncs)."""
        seconds = time.perf_counter() - self.epoch_started
        images = self.images_seen * self.trainer.world_size
        stats = {
            "train_loss": float(self.train_loss.compute()) if self.images_seen else float("nan"),
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "images_per_s": images / self.train_seconds if self.train_seconds > 0 else 0.0,
        }
        self.train_loss.reset()
        return stats

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.ml_metrics is not None:
            self.val_stats = self.ml_metrics.compute_and_reset()
            self.log_dict(self.val_stats, prog_bar=True, sync_dist=False)
            return
        stats = {
            "val_loss": float(self.val_loss.compute()),
            "val_accuracy": float(self.val_accuracy.compute()),
            "val_f1_macro": float(self.val_f1.compute()),
        }
        counts = self.val_confusion.compute().sum(0)
        for metric in (self.val_loss, self.val_accuracy, self.val_f1, self.val_confusion):
            metric.reset()
        # Logged so ModelCheckpoint / EarlyStopping can monitor them (already synced across ranks).
        self.log_dict(stats, prog_bar=True, sync_dist=False)
        self.val_stats = stats
        self._warn_if_collapsed(counts, self.current_epoch)

    def _warn_if_collapsed(self, counts: torch.Tensor, epoch: int) -> None:
        total = float(counts.sum())
        if total <= 0 or len(self.class_names) < 2:
            return
        top = int(counts.argmax())
        share = float(counts[top]) / total
        if share < COLLAPSE_SHARE:
            return
        # A net trained from scratch often predicts one class for an epoch while it warms up;
        # the BatchNorm trap keeps it there. So: info the first time, a warning when it persists.
        persists = epoch - 1 in self.collapsed_epochs
        self.collapsed_epochs.append(epoch)
        log.log(logging.WARNING if persists else logging.INFO,
                "epoch %d: %.0f%% of validation predictions are class %r%s", epoch + 1, 100 * share,
                self.class_names[top],
                ": the model has collapsed to one class (in eval mode; check BatchNorm running statistics: "
                "model.bn_momentum, more data per class, a lower optim.lr)" if persists else
                " (usual in the first epochs from scratch; a warning follows if it persists)")

    def _set_backbone_frozen(self, frozen: bool) -> None:
        head = {id(p) for p in models.head_parameters(self.model)}
        for param in self.model.parameters():
            if id(param) not in head:
                param.requires_grad_(not frozen)

    # ---- optimizer and schedule -------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.config.optim
        # "find" is replaced by the finder's suggestion before training; the finder sets its own LRs.
        lr = opt.lr if isinstance(opt.lr, float) else 1e-3
        groups = _param_groups(self.model, lr, opt.weight_decay, opt.backbone_lr_mult)
        if opt.name == "sgd":
            # Not fused: torch 2.14's fused SGD fails on a first step where frozen parameters have no gradient.
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=opt.momentum,
                                                               nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, fused=_fused_step_available(groups))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.config.trainer.epochs))
        warmup = min(total - 1, int(opt.warmup_epochs * steps_per_epoch))
        factor = _lr_factor(self, opt.schedule, total, warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def progress(self, step: int, total: int) -> float:
        """Fraction of training done: by steps, or by the time budget when that runs out first."""
        done = step / total
        if self.time_budget_s > 0 and self._trainer is not None:
            timer = next((c for c in self.trainer.callbacks if isinstance(c, pl.callbacks.Timer)), None)
            if timer is not None:
                done = max(done, timer.time_elapsed("train") / self.time_budget_s)
        return min(1.0, done)

    # ---- checkpoints: imgclf metadata, EMA weights saved as the model ---------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["imgclf"] = make_meta(self.config, self.class_names, self.pre)
        if self.ema is not None:
            # The shipped model is the EMA one; the raw weights are kept to resume training.
            _rename_prefix(checkpoint["state_dict"], "model.", "raw.")
            _rename_prefix(checkpoint["state_dict"], "ema.module.", "model.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            _rename_prefix(checkpoint["state_dict"], "model.", "ema.module.")
            _rename_prefix(checkpoint["state_dict"], "raw.", "model.")


def _param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_mult: float) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay or not, and with backbone_lr_mult != 1, head vs backbone LR.

    The head's groups come first, so param_groups[0]["lr"] (metrics.csv's lr) is optim.lr's.
    With a multiplier of 1 the layout is the two groups of earlier runs, which --resume expects.
    """
    head = {id(p) for p in models.head_parameters(model)} if backbone_mult != 1.0 else set()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(h, d): [] for h in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        # Weight decay on BatchNorm/LayerNorm scales and biases only hurts: the usual exclusion.
        decays = not (param.ndim <= 1 or name.endswith(".bias"))
        buckets[(id(param) in head or backbone_mult == 1.0, decays)].append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": lr if is_head else lr * backbone_mult}
            for (is_head, decays), params in buckets.items() if params]


def _fused_step_available(groups: list[dict[str, Any]]) -> bool | None:
    """True where torch has a fused optimizer step for every parameter's device (CPU, CUDA).

    On CPU torch otherwise picks its per-tensor loop: 8.6% of a half-width ResNet-18's training
    time in a profile of the Fashion-MNIST run (docs/benchmarks.md). None keeps torch's default.
    """
    devices = {param.device.type for group in groups for param in group["params"]}
    return True if devices and devices <= {"cpu", "cuda"} else None


def _rename_prefix(state: dict[str, Any], old: str, new: str) -> None:
    """Move every tensor under `old` to `new`, in place."""
    for key in [k for k in state if k.startswith(old)]:
        state[new + key.removeprefix(old)] = state.pop(key)


def _lr_factor(module: ImageClassifier, schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine / one-cycle / constant.

    A closure, not an object: LambdaLR would copy an object's attributes (the module) into
    its state_dict, and checkpoints must stay plain data for weights_only loading.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        # Progress can come from the time budget, so a run cut by max_time still ends annealed.
        done = module.progress(step, total)
        start = warmup / total
        frac = min(1.0, max(0.0, (done - start) / max(1e-9, 1.0 - start)))
        if schedule == "onecycle":
            return 1.0 - frac  # warmup up, linear anneal down: the 1cycle triangle
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor
