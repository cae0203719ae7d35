"""Encoder classifiers: features come back in the order of the data whatever batching embed chooses."""
from __future__ import annotations

import torch

from splice.train.data import TextDataset
from splice.train.tasks import EncoderClassifier, embed


def collate(batch):
    """Texts are space-separated token ids; right-padded with 0 to the batch's longest."""
    ids = [[int(w) for w in text.split()] for text, _ in batch]
    width = max(len(x) for x in ids)
    return {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y for _, y in batch])}


def test_embed_returns_features_in_data_order_despite_length_sorted_batches(tiny):
    model = EncoderClassifier(tiny["bert"].build(), 3)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (23,), generator=g).tolist()
    texts = [" ".join(str(int(t)) for t in torch.randint(4, 100, (n,), generator=g)) for n in lengths]
    data = TextDataset(texts, [i % 3 for i in range(23)], ["a", "b", "c"])
    feats, labels = embed(model, data, collate, batch_size=4, progress=False)
    assert labels.tolist() == data.labels
    for i, item in enumerate(data):
        one = collate([item])
        want = model.features(one["input_ids"], one["attention_mask"])[0]
        torch.testing.assert_close(feats[i], want, rtol=1e-5, atol=1e-5)
