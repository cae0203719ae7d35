"""The README.md model card of a merged model: what was merged, how, and the exact config that did it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from splice.merge.plan import MergePlan

_TEMPLATE = """---
{front}---
# {name}

This {what} is a merge of fine-tunes of one base, made with splice (`splice merge`).

## Merge details

- Method: **{method}**{reference}
- Base model: {base}
- Merged models:
{models}
- Output: {output}

## Configuration

The following YAML configuration produced this model (`splice merge config.yaml OUT{flags}` reproduces it):

```yaml
{config}
```
"""


def model_card(plan: MergePlan, yaml_text: str, name: str, *, kind: str = "model", modules: int = 0,
               seed: int = 0) -> str:
    """The card's markdown, with a YAML front matter that the HF hub reads (base_model, tags).

    Args:
        plan: the merge plan (method, inputs, output tensors).
        yaml_text: the merge config as the user wrote it.
        name: the output folder's name, used as the title.
        kind: "model" or "lora" (an adapter folder), for the tags.
        modules: for a LoRA output, how many modules it updates.
        seed: the merge's seed, named in the command that reproduces it when not the default.
    """
    cfg = plan.config
    refs = [str(r) for r in cfg.model_refs() if r != cfg.base_model and r != cfg.tokenizer_source]
    front: dict[str, Any] = {"tags": ["merge", "splice", *(["lora", "peft"] if kind == "lora" else [])],
                             "library_name": "peft" if kind == "lora" else "transformers"}
    if cfg.base_model is not None:
        front["base_model"] = [str(cfg.base_model)]
    method = plan.method
    return _TEMPLATE.format(
        front=yaml.safe_dump(front, sort_keys=False),
        name=name,
        what="LoRA adapter" if kind == "lora" else "model",
        method=method.name,
        reference=f" ({method.reference})" if method.reference else "",
        base=f"`{cfg.base_model}`" if cfg.base_model else "none",
        models="\n".join(f"  - `{r}`" for r in refs) or "  - (none)",
        output=(f"a LoRA adapter updating {modules} modules" if kind == "lora" else
                f"{len(plan.tasks)} tensors, {plan.num_layers} layers"),
        config=yaml_text.strip(),
        flags=(" --out-format lora" if kind == "lora" else "") + (f" --seed {seed}" if seed else "")
        + (" --calibration DATA" if plan.method.needs else ""),
    )
