"""/v1/embeddings on a tiny BERT with LoRA adapters, through the `openai` client (which asks for base64)."""
from __future__ import annotations

import openai
import pytest
import torch
from transformers import BertConfig, BertModel

import splice
from splice.serve import ServerThread, build_app

from .conftest import word_tokenizer


def bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=len(word_tokenizer()), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, attn_implementation="eager")).eval()


def library_embedding(model, tok, text: str) -> torch.Tensor:
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return torch.nn.functional.normalize(model(**enc).last_hidden_state.mean(1), dim=-1)[0]


def test_embeddings_per_adapter_equal_the_library(tmp_path):
    tok = word_tokenizer()
    bert().save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    for i, name in enumerate(["pos", "neg"]):
        m = bert()
        splice.adapt(m, splice.LoraConfig(r=4, target_modules=["query", "value"]))
        with torch.no_grad():
            for p in splice.trainable_parameters(m):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
        splice.save_adapter(m, tmp_path / "adapters" / name)
    texts = ["w5 w6 w7", "w10 w11", "w20 w21 w22 w23 w24"]
    with ServerThread(build_app(str(tmp_path / "bert"), tmp_path / "adapters", model_name="bert")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        got = {name: client.embeddings.create(model=name, input=texts) for name in ("bert", "pos", "neg")}
        floats = client.embeddings.create(model="pos", input=texts[0], encoding_format="float")
        with pytest.raises(openai.BadRequestError, match="embeddings need an encoder|causal LM"):
            client.completions.create(model="bert", prompt="w5", max_tokens=2)
    for name, resp in got.items():
        model = bert() if name == "bert" else splice.load_adapter(bert(), tmp_path / "adapters" / name)
        assert [d.index for d in resp.data] == [0, 1, 2]
        for text, d in zip(texts, resp.data):
            assert torch.allclose(torch.tensor(d.embedding), library_embedding(model, tok, text), atol=1e-5)
    assert torch.allclose(torch.tensor(floats.data[0].embedding), torch.tensor(got["pos"].data[0].embedding))
    assert not torch.allclose(torch.tensor(got["pos"].data[0].embedding), torch.tensor(got["bert"].data[0].embedding),
                              atol=1e-3)
