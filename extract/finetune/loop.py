"""The training loop: optimiser and schedule, one epoch (train or validate), early stopping."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from penult.core import OptionError
from penult.extract.finetune.checkpoint import resume, save_state, save_weights, write_card
from penult.extract.finetune.data import Split, TrainData, epoch_order, load
from penult.extract.finetune.network import Built, augment, build
from penult.extract.finetune.options import FinetuneError, FinetuneOptions, FinetuneResult
from penult.extract.finetune.plot import plot_curve
from penult.extract.finetune.probe import probe_init
from penult.extract.images import auto_resize, mostly_greyscale, spread
from penult.extract.loader import batches
from penult.extract.model import network_fingerprint, pick_device, pick_precision
from penult.extract.registry import Preprocess, get_spec
from penult.extract.weights import state_sha256
from torch import nn
from tqdm.auto import tqdm

__all__ = ["Run", "batch_loss", "finetune", "resolve_auto", "run_epoch"]

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Run:
    """What every epoch of one run shares."""

    model: nn.Module
    opts: FinetuneOptions
    pre: Preprocess
    device: torch.device
    precision: str = "fp32"  # or bf16, fp16 (autocast)
    opt: torch.optim.Optimizer | None = None
    sched: Any = None  # LambdaLR (stepped per optimiser step) or ReduceLROnPlateau (per epoch)
    scaler: torch.amp.GradScaler | None = None
    rng: np.random.Generator | None = None  # epoch order
    gen: torch.Generator | None = None  # augmentation

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.precision)

    def autocast(self):
        """bf16/fp16 autocast on the run's device, or a no-op context for fp32."""
        dtype = self.dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.dtype is not None)


def batch_loss(
    logits, aux, target, coarse, opts: FinetuneOptions, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, mean loss over the whole batch for the curve).

    Online hard-example mining keeps the ``hard_mining`` fraction of the batch with the highest
    losses; the auxiliary coarse-label loss is added per image, weighted by ``aux_weight``.
    """
    smooth = opts.label_smoothing if train else 0.0
    per = nn.functional.cross_entropy(
        logits.float(), target, reduction="none", label_smoothing=smooth
    )
    full = per.mean()
    if not train:
        return full, full
    if aux is not None:
        per = per + opts.aux_weight * nn.functional.cross_entropy(
            aux.float(), coarse, reduction="none", label_smoothing=smooth
        )
    if 0 < opts.hard_mining < 1:
        per = per.topk(max(1, math.ceil(opts.hard_mining * len(per)))).values
    return per.mean(), full


@dataclass
class _Tally:
    loss: float = 0.0
    correct: int = 0
    aux_correct: int = 0
    n: int = 0

    def add(self, full, logits, target, aux, ctarget) -> None:
        self.loss += float(full.detach()) * len(target)
        self.correct += int((logits.argmax(1) == target).sum())
        if aux is not None:
            self.aux_correct += int((aux.argmax(1) == ctarget).sum())
        self.n += len(target)

    def means(self, coarse: bool) -> dict[str, float]:
        n = max(self.n, 1)
        out = {"loss": self.loss / n, "acc": self.correct / n}
        if coarse:
            out["aux_acc"] = self.aux_correct / n
        return out


def _optimise(run: Run, loss: torch.Tensor, step: int) -> None:
    """Backward; the gradients of ``accumulate`` batches are summed before each optimiser step."""
    run.scaler.scale(loss / run.opts.accumulate).backward()
    if step % run.opts.accumulate == 0:
        run.scaler.step(run.opt)  # fp16: skipped when gradients overflowed; else plain opt.step()
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        if isinstance(run.sched, torch.optim.lr_scheduler.LambdaLR):
            run.sched.step()


def run_epoch(run: Run, split: Split, *, train: bool) -> dict[str, float]:
    """Mean loss and accuracy (and coarse-head accuracy) over one pass, training or evaluation."""
    opts = run.opts
    order = epoch_order(split.y, opts.balanced, run.rng) if train else np.arange(len(split.y))
    run.model.train(train)
    tally, step = _Tally(), 0
    desc = "train" if train else "validate"
    bar = tqdm(total=len(order), desc=desc, unit="img", disable=not opts.progress, leave=False)
    if train:
        run.opt.zero_grad(set_to_none=True)
    files = [split.files[i] for i in order]
    for batch in batches(
        files, run.pre, run.device, batch_size=opts.batch_size, workers=opts.workers,
        max_pixels=opts.max_pixels,
    ):  # fmt: skip
        bar.update(len(batch.indices) + len(batch.failed))
        if not len(batch.indices):
            continue
        step += 1
        rows = order[batch.indices]
        target = torch.as_tensor(split.y[rows], device=run.device)
        ctarget = None
        if split.coarse is not None:
            ctarget = torch.as_tensor(split.coarse[rows], device=run.device)
        x = batch.images.to(run.device, non_blocking=True)
        if train and opts.augment:
            x = augment(x, run.pre.crop, run.gen, opts.augment_style)
        with torch.set_grad_enabled(train), run.autocast():
            logits, aux = run.model(x)
            loss, full = batch_loss(logits, aux, target, ctarget, opts, train)
        if train:
            _optimise(run, loss, step)
        tally.add(full, logits, target, aux, ctarget)
    bar.close()
    return tally.means(split.coarse is not None)


def _schedule(opt, opts: FinetuneOptions, steps_per_epoch: int):
    """Linear warm-up then cosine decay per optimiser step, or ReduceLROnPlateau per epoch."""
    if opts.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=1)
    warm, total = opts.warmup_epochs * steps_per_epoch, opts.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _optimiser(run: Run, trainable: list[nn.Parameter], n_train: int) -> None:
    """AdamW with a small rate for the backbone, a larger one for the new heads."""
    opts, model = run.opts, run.model
    heads = [*model.head.parameters(), *(model.aux.parameters() if model.aux else [])]
    run.opt = torch.optim.AdamW(
        [{"params": trainable, "lr": opts.lr_backbone}, {"params": heads, "lr": opts.lr_head}],
        weight_decay=opts.weight_decay,
    )
    steps = max(1, math.ceil(n_train / (opts.batch_size * opts.accumulate)))
    run.sched = _schedule(run.opt, opts, steps)
    # fp16 gradients underflow without loss scaling (older GPUs); bf16 and fp32 need none
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)


def _card(spec, run: Run, data: TrainData, built: Built, head_init: str, store_path) -> dict:
    files = data.train.files
    listed = np.frombuffer("\n".join(sorted(files)).encode(), np.uint8)
    return {
        "format": "penult-finetune", "base_backbone": spec.name, "options": asdict(run.opts),
        "classes": data.classes, "coarse_classes": data.coarse_classes, "head_init": head_init,
        "preprocessing": run.pre.to_dict(), "frozen_parameters": built.frozen_parameters,
        "trainable_parameters": sum(p.numel() for p in built.trainable),
        "data": {"train": len(files), "val": len(data.val.files), "store": str(store_path),
                 "train_sha256": state_sha256({"f": torch.tensor(listed)})},
        "device": str(run.device), "precision": run.precision, "curve": [], "finished": False,
    }  # fmt: skip


def _epochs(run: Run, data: TrainData, card: dict, out: Path, built: Built, on_epoch) -> None:
    """Train until ``epochs`` or ``patience`` epochs without a better validation loss; the best
    epoch's network is saved as ``out`` and every epoch leaves a resumable state."""
    opts = run.opts
    start, best, bad = resume(out, run, card)
    run.rng = np.random.default_rng(opts.seed + start)
    run.gen = torch.Generator().manual_seed(opts.seed + start)
    for epoch in range(start, opts.epochs):
        t0 = time.perf_counter()
        tr = run_epoch(run, data.train, train=True)
        va = run_epoch(run, data.val, train=False)
        if isinstance(run.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.sched.step(va["loss"])
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in tr.items()}}
        row.update({f"val_{k}": v for k, v in va.items()}, seconds=time.perf_counter() - t0)
        card["curve"].append(row)
        log.info("epoch %d: %s", epoch + 1, row)
        if on_epoch is not None:
            on_epoch(row)
        if va["loss"] < best:
            best, bad = va["loss"], 0
            card["weights_sha256"] = save_weights(out, run.model.embedder.net, built.classifier)
            card["best_epoch"] = epoch + 1
        else:
            bad += 1
        save_state(out, run, card, epoch + 1, best, bad)
        if bad >= opts.patience:
            card["stopped_early"] = epoch + 1
            break


def resolve_auto(opts: FinetuneOptions, files: list[str]) -> FinetuneOptions:
    """``auto`` resize and augmentation made concrete from a sample of the training images, so
    that the card, a resumed run and the new embeddings all record what was actually used."""
    if "auto" not in (opts.resize, opts.augment_style):
        return opts
    grey, note = mostly_greyscale([files[i] for i in spread(len(files))])
    resize = auto_resize(grey, opts.crop_pct) if opts.resize == "auto" else opts.resize
    style = opts.augment_style
    if style == "auto":
        style = "plankton" if grey else "photo"
    log.info("auto: --resize %s --augment %s (%s)", resize, style, note)
    return replace(opts, resize=resize, augment_style=style)


def finetune(
    store_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: FinetuneOptions = FinetuneOptions(),  # noqa: B008
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``opts.backbone`` on the store's train split; write ``out`` (safetensors),
    ``out.json`` (card) and ``out.curve.png``. ``on_epoch`` sees each epoch's curve row."""
    out = Path(out)
    spec = get_spec(opts.backbone)
    if not spec.adapter.finetunable(spec.arch):
        raise FinetuneError(f"fine-tuning supports timm backbones and ResNets, not {spec.name}")
    if opts.head_init not in ("probe", "random"):
        raise OptionError(f"head_init must be 'probe' or 'random', not {opts.head_init!r}")
    data = load(store_path, opts)
    opts = resolve_auto(opts, data.train.files)
    torch.manual_seed(opts.seed)
    pre = spec.preprocess(opts.crop_pct, mode=opts.resize)
    built = build(spec, pre, opts, len(data.classes), len(data.coarse_classes))
    device = pick_device(opts.device)
    run = Run(built.model.to(device), opts, pre, device, pick_precision(opts.precision, device))
    head_init = "random"
    if opts.head_init == "probe":
        base = network_fingerprint(spec, pre, built.base_sha)
        head_init = probe_init(run, store_path, data, base)
    _optimiser(run, built.trainable, len(data.train.files))
    card = _card(spec, run, data, built, head_init, store_path)
    _epochs(run, data, card, out, built, on_epoch)
    card["finished"] = True
    write_card(out, card)
    if card["curve"]:
        card["curve_png"] = str(plot_curve(card, f"{out}.curve.png"))
    return FinetuneResult(out, card, card["curve"], run.model)
