"""Fine-tuning a backbone on a store's labelled images; the result becomes one more store backbone.

Recipe (each an option): early stages frozen, a new linear head (initialised from a linear probe on
the frozen embeddings, so that the first steps refine features instead of undoing them for a random
head), a small learning rate for the backbone and a larger one for the head, linear warm-up then
cosine decay (or ReduceLROnPlateau), label smoothing, augmentation, class-balanced sampling, online
hard-example mining, an auxiliary coarse-label loss (genus, family) on an intermediate stage, and
early stopping on validation loss.
Images come through the extraction loader (workers, shared-memory uint8 batches, prefetch).
Checkpoints are safetensors plus a JSON card; an interrupted run resumes from its last epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from extract.loader import default_workers, make_loader
from extract.model import _build_full, pick_device, pick_precision
from extract.registry import get_spec
from extract.weights import load_pretrained, state_sha256
from features import OptionError, PenultError
from features.files import atomic_path, write_text
from features.labels import TEST, TRAIN, VAL, make_split

__all__ = [
    "FinetuneError",
    "FinetuneOptions",
    "FinetuneResult",
    "augment",
    "extract_finetuned",
    "finetune",
    "plot_curve",
    "stages",
]

log = logging.getLogger(__name__)


class FinetuneError(PenultError, ValueError):
    """The store, backbone or checkpoint cannot be fine-tuned as asked."""


@dataclass(frozen=True)
class FinetuneOptions:
    backbone: str = "efficientnet_lite0"
    label: str = "label"
    split: str = "split"
    unfreeze: int = 1  # trainable stages, counted from the deepest
    epochs: int = 10
    batch_size: int = 32
    accumulate: int = 1  # batches per optimiser step (effective batch = batch_size x accumulate)
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # or "plateau"
    label_smoothing: float = 0.1
    augment: bool = True
    balanced: bool = True
    patience: int = 3  # epochs without a better validation loss before stopping
    val_fraction: float = 0.1  # of train, when the store has no 'val' split (test is never used)
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    max_train: int | None = None  # cap on training images (quick trials, tests)
    crop_pct: float | None = None  # None: the weights' centre crop; 1.0 keeps the whole image
    head_init: str = "probe"  # "probe": logistic regression on frozen embeddings; "random"
    bn_train: bool = (
        False  # update BatchNorm statistics in the trainable stages (default: keep them)
    )
    hard_mining: float = 0.0  # keep this fraction of each batch's highest losses (0: off)
    aux_level: str | None = (
        None  # coarse label (store column or taxonomy CSV column) for the aux loss
    )
    taxonomy: str | None = None  # CSV class,<coarse levels...> (else the store's label columns)
    aux_weight: float = 0.3
    aux_stage: int = 2  # stage whose pooled output the coarse head reads, counted from the deepest
    seed: int = 0
    progress: bool = True


@dataclass
class FinetuneResult:
    checkpoint: Path
    card: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)


def stages(net: nn.Module) -> list[nn.Module]:
    """The network's stages from shallow to deep (what ``unfreeze`` counts from the end)."""
    if hasattr(net, "blocks") and hasattr(net, "conv_stem"):  # timm EfficientNet / MobileNet
        return [
            nn.ModuleList([net.conv_stem, net.bn1]),
            *net.blocks,
            nn.ModuleList([net.conv_head, net.bn2]),
        ]
    if hasattr(net, "layer4"):  # torchvision ResNet
        return [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]
    raise FinetuneError(
        f"{type(net).__name__}: no known stages to freeze; fine-tuning not supported"
    )


class _Trainable(nn.Module):
    """uint8 images -> normalised -> backbone pre-logits -> new linear head (+ optional coarse head)."""

    def __init__(self, net: nn.Module, mean, std, n_classes: int, dim: int):
        super().__init__()
        self.net = net
        self.timm_net = hasattr(net, "forward_head")
        if not self.timm_net:  # torchvision ResNet: everything before the final fc
            self.trunk = nn.Sequential(*list(net.children())[:-1])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0))
        self.head = nn.Linear(dim, n_classes)
        self.aux: nn.Linear | None = None
        self._mid: torch.Tensor | None = None
        self.frozen: list[nn.Module] = []  # stages kept in eval mode: BatchNorm statistics too
        self.bn_train = True  # False: every BatchNorm keeps its pretrained statistics

    def attach_aux(self, stage: nn.Module, n_coarse: int) -> None:
        """A coarse-label head on ``stage``'s globally pooled output (read through a forward hook)."""

        def keep(_m, _i, out):
            self._mid = out

        stage.register_forward_hook(keep)
        with torch.no_grad():
            self.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=self.mean.device))
        self.aux = nn.Linear(self._mid.shape[1], n_coarse).to(self.mean.device)

    def train(self, mode: bool = True) -> _Trainable:
        super().train(mode)
        for m in self.frozen:
            m.eval()
        if not self.bn_train:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-logits embedding, the same layer `penult extract` stores."""
        x = ((x.float() - self.mean) * self.inv_std).contiguous(memory_format=torch.channels_last)
        if self.timm_net:
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.trunk(x).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits, coarse logits or None)."""
        logits = self.head(self.embed(x))
        if self.aux is None:
            return logits, None
        mid, self._mid = self._mid, None  # do not keep the activations alive between batches
        return logits, self.aux(mid.float().mean((2, 3)))


def augment(batch: torch.Tensor, crop: int, rng: torch.Generator) -> torch.Tensor:
    """Random resized crop, horizontal flip, small rotation and colour jitter, per image (uint8).

    Greyscale images (all channels equal, e.g. plankton) get brightness/contrast only.
    """
    from torchvision.transforms import v2

    geo = v2.Compose(
        [
            v2.RandomResizedCrop(crop, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
        ]
    )
    colour = v2.ColorJitter(0.3, 0.3, 0.3, 0.05)
    grey = v2.ColorJitter(0.3, 0.3)
    out = []
    for img in batch:
        img = geo(img)
        is_grey = bool((img[0] == img[1]).all() and (img[1] == img[2]).all())
        out.append((grey if is_grey else colour)(img))
    return torch.stack(out)


def _freeze(net: nn.Module, unfreeze: int) -> tuple[list[str], list[nn.Module]]:
    """Freeze all but the last ``unfreeze`` stages: (frozen parameter names, frozen stages)."""
    all_stages = stages(net)
    if not 1 <= unfreeze <= len(all_stages):
        raise FinetuneError(
            f"--unfreeze must be between 1 and {len(all_stages)} (stages of this network)"
        )
    net.requires_grad_(False)
    for st in all_stages[len(all_stages) - unfreeze :]:
        st.requires_grad_(True)
    return [n for n, p in net.named_parameters() if not p.requires_grad], all_stages[
        : len(all_stages) - unfreeze
    ]


@dataclass
class _Data:
    files: list[str]  # training images
    y: np.ndarray
    vfiles: list[str]  # validation images
    vy: np.ndarray
    classes: list[str]
    rows: np.ndarray  # store rows of the training images (for the linear-probe initialisation)
    coarse: np.ndarray | None = None  # coarse-label ids of train, then val images (aux loss)
    coarse_classes: list[str] = field(default_factory=list)


def _coarse_of(store_path, table, opts: FinetuneOptions, y: np.ndarray) -> np.ndarray:
    """The coarse label of every store row: a store column, or a taxonomy CSV column via the label."""
    level = opts.aux_level
    if not opts.taxonomy:
        if level not in table.labels:
            raise FinetuneError(
                f"{store_path}: no label column {level!r} for the auxiliary loss "
                f"(columns: {', '.join(sorted(table.labels))}); pass --taxonomy CSV"
            )
        return np.array(table.labels[level])
    from features.labels import read_taxonomy

    return np.array(read_taxonomy(opts.taxonomy).column(level, y.tolist()))


def _data(store_path, opts: FinetuneOptions) -> _Data:
    """Training and validation images from the store's train (and val) split, with their labels."""
    from features import FeatureStore

    t = FeatureStore(store_path).images()
    if opts.label not in t.labels or opts.split not in t.labels:
        raise FinetuneError(
            f"{store_path}: fine-tuning needs label columns {opts.label!r} and {opts.split!r}; train a head first to make a split"
        )
    y, split = np.array(t.labels[opts.label]), np.array(t.labels[opts.split])
    ok = np.array([not e for e in t.error]) & (y != "")
    files = np.array([os.path.join(r, p) for r, p in zip(t.root, t.path, strict=True)])
    tr, va = np.flatnonzero(ok & (split == TRAIN)), np.flatnonzero(ok & (split == VAL))
    rng = np.random.default_rng(opts.seed)
    if opts.max_train and len(tr) > opts.max_train:
        tr = np.sort(rng.choice(tr, opts.max_train, replace=False))
    if len(va) == 0:  # hold out part of train; the test split stays untouched for evaluation
        held = make_split(y[tr], test_size=opts.val_fraction, seed=opts.seed) == TEST
        tr, va = tr[~held], tr[held]
    classes = sorted(set(y[tr]))
    idx = {c: i for i, c in enumerate(classes)}
    va = np.array([i for i in va if y[i] in idx], dtype=int)
    d = _Data(
        files[tr].tolist(),
        np.array([idx[c] for c in y[tr]]),
        files[va].tolist(),
        np.array([idx[c] for c in y[va]]),
        classes,
        np.asarray(tr),
    )
    if opts.aux_level:
        coarse = _coarse_of(store_path, t, opts, y)[np.concatenate([tr, va])]
        d.coarse_classes = sorted(set(coarse))
        cidx = {c: i for i, c in enumerate(d.coarse_classes)}
        d.coarse = np.array([cidx[c] for c in coarse])
    return d


def _schedule(opt, opts: FinetuneOptions, steps_per_epoch: int):
    if opts.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=1)
    warm, total = opts.warmup_epochs * steps_per_epoch, opts.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _epoch_files(
    files: list[str], y: np.ndarray, balanced: bool, rng: np.random.Generator
) -> np.ndarray:
    if not balanced:
        return rng.permutation(len(files))
    counts = np.bincount(y)
    w = 1.0 / counts[y]
    return rng.choice(len(files), len(files), replace=True, p=w / w.sum())


def _batch_loss(
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


def _loader(files: list[str], pre, opts: FinetuneOptions, device: torch.device):
    """The extraction loader with the run's workers (no more than there are batches)."""
    workers = default_workers(device) if opts.workers is None else opts.workers
    return make_loader(
        files,
        pre,
        batch_size=opts.batch_size,
        workers=min(workers, max(1, len(files) // opts.batch_size)),
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
    )


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device``, or a no-op context for fp32 (``dtype`` None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _run_epoch(
    model,
    files,
    y,
    opts,
    pre,
    *,
    train: bool,
    coarse=None,
    opt=None,
    sched=None,
    scaler=None,
    rng=None,
    gen=None,
    device=None,
    dtype=None,
) -> dict[str, float]:
    """Mean loss and accuracy (and coarse-head accuracy) over one pass, training or evaluation."""
    order = _epoch_files(files, y, opts.balanced, rng) if train else np.arange(len(files))
    loader = _loader([files[i] for i in order], pre, opts, device)
    model.train(train)
    total, correct, aux_correct, n = 0.0, 0, 0, 0
    bar = tqdm(
        total=len(order),
        desc="train" if train else "validate",
        unit="img",
        disable=not opts.progress,
        leave=False,
    )
    step = 0
    if train:
        opt.zero_grad(set_to_none=True)
    for batch in loader:
        if not len(batch.indices):
            continue
        step += 1
        rows = order[batch.indices]
        target = torch.as_tensor(y[rows], device=device)
        ctarget = None if coarse is None else torch.as_tensor(coarse[rows], device=device)
        x = batch.images.to(device, non_blocking=True)
        if train and opts.augment:
            x = augment(x, pre.crop, gen)
        with (
            torch.set_grad_enabled(train),
            _autocast(device, dtype),
        ):
            logits, aux = model(x)
            loss, full = _batch_loss(logits, aux, target, ctarget, opts, train)
        if train:  # gradients of ``accumulate`` batches are summed before each optimiser step
            scaler.scale(loss / opts.accumulate).backward()
            if step % opts.accumulate == 0:
                scaler.step(opt)  # fp16: skipped when gradients overflowed; else plain opt.step()
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                    sched.step()
        total += float(full.detach()) * len(target)
        correct += int((logits.argmax(1) == target).sum())
        if aux is not None:
            aux_correct += int((aux.argmax(1) == ctarget).sum())
        n += len(target)
        bar.update(len(batch.indices) + len(batch.failed))
    bar.close()
    out = {"loss": total / max(n, 1), "acc": correct / max(n, 1)}
    if coarse is not None:
        out["aux_acc"] = aux_correct / max(n, 1)
    return out


def _save(path: Path, model: _Trainable, classifier: dict[str, torch.Tensor]) -> str:
    """safetensors of the whole classifier network (trunk + the original ImageNet head), so that
    `build_backbone(base, weights=path)` loads it like any weights file; returns its weights hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    state.update(classifier)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return state_sha256(state)


def finetune(
    store_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: FinetuneOptions = FinetuneOptions(),
) -> FinetuneResult:  # noqa: B008
    """Fine-tune ``opts.backbone`` on the store's train split; write ``out`` (safetensors) + ``out.json``."""
    out = Path(out)
    spec = get_spec(opts.backbone)
    if spec.source != "timm" and not spec.arch.startswith("resnet"):
        raise FinetuneError(f"fine-tuning supports timm backbones and ResNets, not {spec.name}")
    data = _data(store_path, opts)
    files, y, vfiles, vy, classes = data.files, data.y, data.vfiles, data.vy, data.classes
    torch.manual_seed(opts.seed)
    net = _build_full(spec)
    load_pretrained(net, spec)
    base_sha = state_sha256(net.state_dict())
    classifier = {
        k: v.clone() for k, v in net.state_dict().items() if k not in _trunk_keys(net, spec)
    }
    frozen, frozen_stages = _freeze(net, opts.unfreeze)
    pre = spec.preprocess(opts.crop_pct)
    model = _Trainable(net, pre.mean, pre.std, len(classes), spec.dim).to(
        memory_format=torch.channels_last
    )
    model.frozen = frozen_stages
    model.bn_train = opts.bn_train
    device = pick_device(opts.device)
    precision = pick_precision(opts.precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.to(device)
    if opts.aux_level:
        all_stages = stages(net)
        if not 1 <= opts.aux_stage <= len(all_stages):
            raise OptionError(f"--aux-stage must be between 1 and {len(all_stages)}")
        if opts.aux_stage > opts.unfreeze:
            raise FinetuneError(
                f"--aux-stage {opts.aux_stage} is frozen: the coarse loss could not train it; "
                f"use --unfreeze {opts.aux_stage} or more"
            )
        model.attach_aux(all_stages[len(all_stages) - opts.aux_stage], len(data.coarse_classes))
    probe = None
    if opts.head_init == "probe":
        probe = _probe_init(model, store_path, data, base_sha, pre, opts, device, dtype)
    elif opts.head_init != "random":
        raise OptionError(f"head_init must be 'probe' or 'random', not {opts.head_init!r}")
    trainable = [p for p in net.parameters() if p.requires_grad]
    heads = [*model.head.parameters(), *(model.aux.parameters() if model.aux else [])]
    opt = torch.optim.AdamW(
        [{"params": trainable, "lr": opts.lr_backbone}, {"params": heads, "lr": opts.lr_head}],
        weight_decay=opts.weight_decay,
    )
    steps = max(1, math.ceil(len(files) / (opts.batch_size * opts.accumulate)))
    sched = _schedule(opt, opts, steps)
    card: dict[str, Any] = {
        "format": "penult-finetune", "base_backbone": spec.name, "options": asdict(opts), "classes": classes,
        "coarse_classes": data.coarse_classes, "head_init": probe or opts.head_init,
        "preprocessing": pre.to_dict(),
        "frozen_parameters": len(frozen), "trainable_parameters": sum(p.numel() for p in trainable),
        "data": {"train": len(files), "val": len(vfiles), "store": str(store_path),
                 "train_sha256": state_sha256({"f": torch.tensor(np.frombuffer("\n".join(sorted(files)).encode(), np.uint8))})},
        "device": str(device), "precision": precision, "curve": [], "finished": False,
    }  # fmt: skip
    # fp16 gradients underflow without loss scaling (older GPUs); bf16 and fp32 need none
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, best, bad = _resume(out, model, opt, sched, scaler, card)
    rng = np.random.default_rng(opts.seed + start)
    gen = torch.Generator().manual_seed(opts.seed + start)
    for epoch in range(start, opts.epochs):
        t0 = time.perf_counter()
        coarse = (None, None) if data.coarse is None else np.split(data.coarse, [len(files)])
        tr = _run_epoch(
            model,
            files,
            y,
            opts,
            pre,
            train=True,
            coarse=coarse[0],
            opt=opt,
            sched=sched,
            scaler=scaler,
            rng=rng,
            gen=gen,
            device=device,
            dtype=dtype,
        )
        va = _run_epoch(
            model, vfiles, vy, opts, pre, train=False, coarse=coarse[1], device=device, dtype=dtype
        )
        vl = va["loss"]
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(vl)
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in tr.items()}}
        row.update({f"val_{k}": v for k, v in va.items()}, seconds=time.perf_counter() - t0)
        card["curve"].append(row)
        log.info("epoch %d: %s", epoch + 1, row)
        if opts.progress:
            aux = f", val {opts.aux_level} acc {va['aux_acc']:.3f}" if "aux_acc" in va else ""
            print(
                f"epoch {epoch + 1}/{opts.epochs}: train loss {tr['loss']:.3f} acc {tr['acc']:.3f}, "
                f"val loss {vl:.3f} acc {va['acc']:.3f}{aux}, {row['seconds']:.0f} s",
                flush=True,
            )
        if vl < best:
            best, bad = vl, 0
            card["weights_sha256"] = _save(out, model, classifier)
            card["best_epoch"] = epoch + 1
        else:
            bad += 1
        _checkpoint(out, model, opt, sched, scaler, card, epoch + 1, best, bad)
        if bad >= opts.patience:
            card["stopped_early"] = epoch + 1
            break
    card["finished"] = True
    _write_json(Path(f"{out}.json"), card)
    if card["curve"]:
        card["curve_png"] = str(plot_curve(card, f"{out}.curve.png"))
    return FinetuneResult(out, card, card["curve"])


def _probe_init(
    model: _Trainable, store_path, data: _Data, base_sha: str, pre, opts, device, dtype
) -> str:
    """Initialise the new head as a logistic regression on the frozen embeddings of the training
    images (linear probing, then fine-tuning): read from the store when it holds this backbone with
    this preprocessing, else computed in one pass. Returns where the embeddings came from."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, source = _stored_embeddings(store_path, data.rows, base_sha, pre), "store"
    if x is None:
        x, source = _embed_pass(model, data.files, pre, opts, device, dtype), "computed"
    scale = StandardScaler().fit(x)
    lr = LogisticRegression(C=0.1, max_iter=300, tol=1e-3).fit(scale.transform(x), data.y)
    w = lr.coef_ / scale.scale_
    b = lr.intercept_ - w @ scale.mean_
    if w.shape[0] == 1:  # binary: softmax over (0, w.x + b) is the logistic model
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        model.head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return f"probe ({source} embeddings, train acc {lr.score(scale.transform(x), data.y):.3f})"


def _stored_embeddings(store_path, rows: np.ndarray, base_sha: str, pre) -> np.ndarray | None:
    """The store's embeddings of ``rows`` from an entry with exactly these weights and preprocessing."""
    from features import FeatureStore

    fs = FeatureStore(store_path)
    for name, entry in fs.backbones().items():
        fp = entry.fingerprint
        p = fp.get("preprocessing", {})
        if fp.get("weights_sha256") != base_sha or (p.get("resize"), p.get("crop")) != (
            pre.resize,
            pre.crop,
        ):
            continue
        if fs.valid(name)[rows].all():
            return fs.embeddings(name, rows)
    return None


def _embed_pass(model: _Trainable, files: list[str], pre, opts, device, dtype) -> np.ndarray:
    """Embeddings of ``files`` under the network as it is (eval mode, no augmentation)."""
    model.eval()
    out = np.zeros((len(files), model.head.in_features), np.float32)
    with torch.no_grad(), _autocast(device, dtype):
        loader = _loader(files, pre, opts, device)
        for batch in tqdm(loader, desc="probe", disable=not opts.progress, leave=False):
            if len(batch.indices):
                out[batch.indices] = model.embed(batch.images.to(device)).float().cpu().numpy()
    return out


def _trunk_keys(net: nn.Module, spec) -> set[str]:
    """State keys of everything but the ImageNet classifier (kept as it was, to save a full network)."""
    if spec.source == "timm":
        head = net.get_classifier()
        head_keys = {
            f"{n}.{k}" for n, m in net.named_modules() if m is head for k in m.state_dict()
        }
    else:
        head_keys = {f"fc.{k}" for k in net.fc.state_dict()}
    return set(net.state_dict()) - head_keys


def _checkpoint(
    out: Path, model, opt, sched, scaler, card, epoch: int, best: float, bad: int
) -> None:
    """Everything needed to resume after ``epoch``: tensors only, loadable with weights_only=True."""
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best": best,
        "bad": bad,
    }
    with atomic_path(f"{out}.resume.pt") as tmp:
        torch.save(state, tmp)
    _write_json(Path(f"{out}.json"), card)


def _resume(out: Path, model, opt, sched, scaler, card) -> tuple[int, float, int]:
    """(first epoch, best val loss, epochs without improvement) from an interrupted run, if any."""
    path = Path(f"{out}.resume.pt")
    if not path.exists() or not Path(f"{out}.json").exists():
        return 0, math.inf, 0
    old = json.loads(Path(f"{out}.json").read_text())
    same = ("backbone", "unfreeze", "crop_pct", "aux_level", "aux_stage", "head_init")
    if (
        old.get("finished")
        or any(old.get("options", {}).get(k) != card["options"][k] for k in same)
        or old.get("classes") != card["classes"]
    ):
        return 0, math.inf, 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a planted pickle, a torn file: never executed
        raise FinetuneError(
            f"{path}: refusing to resume from it ({type(e).__name__}); delete it to start over"
        ) from None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    card["curve"] = old["curve"]
    for k in ("weights_sha256", "best_epoch"):
        if k in old:
            card[k] = old[k]
    card["resumed_at_epoch"] = int(state["epoch"])
    return int(state["epoch"]), float(state["best"]), int(state["bad"])


def extract_finetuned(
    store_path: str | os.PathLike[str], checkpoint: str | os.PathLike[str], *, progress: bool = True
) -> str:
    """Embed every image of the store with the fine-tuned network, as backbone ``<base>@ft-<hash>``."""
    from extract.run import ExtractOptions, extract
    from extract.sources import Listing
    from features import FeatureStore

    card = json.loads(Path(f"{checkpoint}.json").read_text())
    name = f"{card['base_backbone']}@ft-{card['weights_sha256'][:8]}"
    table = FeatureStore(store_path).images()
    for root in sorted(set(table.root)):
        paths = [p for p, r in zip(table.path, table.root, strict=True) if r == root]
        opts = ExtractOptions(
            backbone=card["base_backbone"],
            weights=str(checkpoint),
            name=name,
            crop_pct=card["options"].get("crop_pct"),
            progress=progress,
        )
        s = extract(store_path, Listing(root=Path(root), paths=paths), opts)
        log.info(s.report())
    return name


def plot_curve(card: dict[str, Any], png: str | os.PathLike[str]) -> Path:
    """Training and validation loss and accuracy per epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = card["curve"]
    ep = [r["epoch"] for r in c]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in c], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in c], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [r["train_acc"] for r in c], "o-", label="train")
    b.plot(ep, [r["val_acc"] for r in c], "o-", label="validation")
    if "val_aux_acc" in c[0]:
        level = card["options"].get("aux_level")
        b.plot(ep, [r["val_aux_acc"] for r in c], "s--", label=f"validation ({level} head)")
        b.legend()
    b.set(
        xlabel="epoch", ylabel="accuracy", title=f"accuracy (best epoch {card.get('best_epoch')})"
    )
    a.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write atomically: a kill leaves the old card or the new one, never half of one."""
    write_text(path, json.dumps(obj, indent=1))
