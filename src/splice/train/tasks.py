"""The two tasks `splice train` knows: text classification on an encoder, and causal language modelling.

Classification follows LP-FT: a linear head is fitted on the frozen, mean-pooled encoder first (the "frozen
probe"), then frozen while the adapter trains. The head is saved next to the adapter (`head.safetensors`,
`task.json`), so any adapter of the same task can be scored with it and merged encoders keep valid heads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from splice.errors import SpliceError
from splice.io.checkpoints import read_json, write_json
from splice.train.data import ClassificationCollator, TextDataset, batches

HEAD_FILE, TASK_FILE = "head.safetensors", "task.json"


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average of the token states where `mask` is 1: (B, T, H), (B, T) → (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """An encoder (any HF model returning `last_hidden_state`), mean pooling and a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        # Prompt methods put their virtual tokens in front of the input: pool over the real tokens only.
        return mean_pool(out.last_hidden_state[:, -attention_mask.shape[1]:], attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask))


@torch.no_grad()
def embed(model: EncoderClassifier, data: TextDataset, collate: ClassificationCollator, batch_size: int = 64,
          desc: str = "embed", progress: bool = True) -> tuple[Tensor, Tensor]:
    """Pooled features and labels of every example, in order."""
    model.eval()
    feats, labels = [], []
    items = list(data)
    # Batches of similar length pad less (a fifth of the tokens on the quality benchmark's test sets); padding is
    # masked out, so the features are the same whatever the batching.
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    n = (len(items) + batch_size - 1) // batch_size
    for batch in tqdm(batches([items[i] for i in order], batch_size), total=n, desc=desc, disable=not progress,
                      leave=False):
        b = collate(batch)
        feats.append(model.features(b["input_ids"], b["attention_mask"]))
        labels.append(b["labels"])
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(feats)[back], torch.cat(labels)[back]


def fit_probe(head: nn.Linear, feats: Tensor, labels: Tensor, *, l2: float = 1e-4, iters: int = 200) -> None:
    """Logistic regression of `head` on fixed features (full-batch L-BFGS: seconds for thousands of examples)."""
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


def accuracy(model: EncoderClassifier, data: TextDataset, collate: ClassificationCollator,
             progress: bool = True, desc: str = "eval") -> float:
    feats, labels = embed(model, data, collate, desc=desc, progress=progress)
    with torch.no_grad():
        return (model.head(feats).argmax(-1) == labels).float().mean().item()


def save_head(model: EncoderClassifier, folder: Path, label_names: list[str], max_length: int) -> None:
    save_file({"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
              str(folder / HEAD_FILE))
    write_json(folder / TASK_FILE, {"task": "classification", "labels": label_names, "pooling": "mean",
                                    "max_length": max_length})


def load_head(model: EncoderClassifier, folder: Path) -> dict[str, Any]:
    """Load the head saved beside an adapter; returns task.json."""
    task = read_json(folder / TASK_FILE)
    try:
        state = load_file(str(folder / HEAD_FILE))
    except Exception as exc:
        raise SpliceError(f"{folder / HEAD_FILE}: cannot read the classification head: {exc}") from None
    if state["weight"].shape != model.head.weight.shape:
        raise SpliceError(f"{folder / HEAD_FILE}: head shape {tuple(state['weight'].shape)} does not fit the "
                          f"model ({tuple(model.head.weight.shape)})")
    model.head.load_state_dict(state)
    return task


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@torch.no_grad()
def perplexity(model: nn.Module, pairs: list, collate: Any, batch_size: int = 8, progress: bool = True) -> float:
    """exp(mean token loss) over the completions of `pairs`."""
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(batches(pairs, batch_size), desc="eval", disable=not progress, leave=False):
        b = collate(batch)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += lm_loss(model, b).item() * n
        count += n
    return float(torch.tensor(total / max(count, 1)).exp())
