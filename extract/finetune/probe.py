"""The new head starts as a linear probe: logistic regression on the frozen embeddings of the
training images, so that the first steps refine features instead of undoing them for a random head."""

from __future__ import annotations

import numpy as np
import torch
from penult.extract.embed import embed_files
from penult.extract.finetune.data import TrainData, stored_embeddings
from penult.features import Fingerprint
from tqdm.auto import tqdm

__all__ = ["embed_pass", "probe_init"]


def probe_init(run, store_path, data: TrainData, base: Fingerprint) -> str:
    """Fit the probe on embeddings read from the store when it holds the base network's own
    (``base``: its fingerprint; else computed in one pass) and copy it into the head; says where they came from."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, source = stored_embeddings(store_path, data.rows, base), "store"
    if x is None:
        x, source = embed_pass(run, data.train.files), "computed"
    y = data.train.y
    scale = StandardScaler().fit(x)
    lr = LogisticRegression(C=0.1, max_iter=300, tol=1e-3).fit(scale.transform(x), y)
    w = lr.coef_ / scale.scale_
    b = lr.intercept_ - w @ scale.mean_
    if w.shape[0] == 1:  # binary: softmax over (0, w.x + b) is the logistic model
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    head = run.model.head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return f"probe ({source} embeddings, train acc {lr.score(scale.transform(x), y):.3f})"


def embed_pass(run, files: list[str]) -> np.ndarray:
    """Embeddings of ``files`` under the network as it is (eval mode, no augmentation)."""
    run.model.eval()
    out = np.zeros((len(files), run.model.head.in_features), np.float32)

    def embed(images: torch.Tensor) -> np.ndarray:
        return run.model.embed(images).float().cpu().numpy()  # (already on run.device)

    with torch.no_grad(), run.autocast():
        done = embed_files(
            files, run.pre, embed, run.device, batch_size=run.opts.batch_size,
            workers=run.opts.workers, max_pixels=run.opts.max_pixels,
        )  # fmt: skip
        for b in tqdm(done, desc="probe", disable=not run.opts.progress, leave=False):
            if b.indices:
                out[b.indices] = b.X
    return out
