"""P-tuning (Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

    embeds' = [f(E) ; E(x)]       E ∈ ℝ^{n × d} learned,  f = MLP (d → h → h → d, ReLU)  or  BiLSTM(h) → MLP

Like prompt tuning, n virtual tokens go in front of the input embeddings, but they are produced by a small
encoder f from a learned table, which the paper finds trains more stably than learning the embeddings directly.
Saved in PEFT's format: `prompt_embeddings` = f(E) (n, d) (the encoder is not saved, as in PEFT), peft_type
P_TUNING.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.prompts.base import PromptConfig, PromptDims
from splice.adapters.registry import register
from splice.errors import SpliceError


@dataclass
class PTuningConfig(PromptConfig):
    """P-tuning; field names follow PEFT's `PromptEncoderConfig`."""

    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = doc("Encoder of the virtual tokens: MLP or LSTM.", default="MLP")
    encoder_hidden_size: int | None = doc("Hidden width of the encoder (default: the embedding width).",
                                          default=None)
    encoder_num_layers: int = doc("LSTM layers (the MLP always has 3 linear layers).", default=2)
    encoder_dropout: float = doc("Dropout between LSTM layers.", default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = str(self.encoder_reparameterization_type).upper()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise SpliceError("encoder_reparameterization_type: must be MLP or LSTM, got "
                              f"{self.encoder_reparameterization_type!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise SpliceError(f"encoder_hidden_size: must be a positive integer, got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise SpliceError(f"encoder_num_layers: must be a positive integer, got {self.encoder_num_layers!r}")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise SpliceError(f"encoder_dropout: must be in [0, 1), got {self.encoder_dropout!r}")

    def peft_fields(self, dims: PromptDims) -> dict:
        return {"encoder_reparameterization_type": self.encoder_reparameterization_type,
                "encoder_hidden_size": self.encoder_hidden_size or dims.token_dim,
                "encoder_num_layers": self.encoder_num_layers, "encoder_dropout": self.encoder_dropout}


@register("p_tuning", config=PTuningConfig, reference="https://arxiv.org/abs/2103.10385")
class PromptEncoder(nn.Module):
    """A table and its encoder (PEFT's `PromptEncoder`, same parameter names: embedding, mlp_head, lstm_head)."""

    def __init__(self, dims: PromptDims, config: PTuningConfig, word_embeddings: nn.Module | None = None):
        super().__init__()
        d, h = dims.token_dim, config.encoder_hidden_size or dims.token_dim
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self.lstm_head = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def virtual_tokens(self) -> Tensor:
        table = self.embedding.weight  # (n, d)
        if self.lstm_head is not None:  # the LSTM reads the n tokens as one sequence
            table = self.lstm_head(table.unsqueeze(0))[0][0]
        return self.mlp_head(table)
