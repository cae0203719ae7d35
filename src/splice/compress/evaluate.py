"""`splice compress --eval`: the accuracy of a classifier before and after compressing its delta.

Works on what `splice train` writes for classification: an adapter folder with ``head.safetensors`` and
``task.json`` beside it (a full fine-tune folder with them works too). The base model gets the uncompressed delta
and then the compressed one, each scored with the saved head on a labelled CSV/JSONL file. The quality benchmark's
tasks (issue #5) will plug in here; until then the data is a file.
"""
from __future__ import annotations

from pathlib import Path

from splice.delta.deltaset import DeltaSet
from splice.errors import SpliceError

__all__ = ["accuracy_with"]


def accuracy_with(base: str, deltas: DeltaSet, head_dir: str | Path, data: str | Path) -> float:
    """Accuracy on `data` of `base` + `deltas` with the classification head saved in `head_dir`.

    Raises:
        SpliceError: no head in `head_dir`, labels in `data` other than the head's, a delta the encoder lacks.
    """
    from splice.io.checkpoints import read_json
    from splice.io.models import load_model
    from splice.train.data import ClassificationCollator, load_classification_file
    from splice.train.tasks import HEAD_FILE, TASK_FILE, EncoderClassifier, accuracy, load_head

    head_dir = Path(head_dir)
    if not (head_dir / HEAD_FILE).is_file() or not (head_dir / TASK_FILE).is_file():
        raise SpliceError(f"{head_dir}: --eval needs the classification head saved beside the delta "
                          f"({HEAD_FILE} + {TASK_FILE}, as `splice train` writes them)")
    task = read_json(head_dir / TASK_FILE)
    ds = load_classification_file(data)
    if list(ds.label_names) != list(task.get("labels", [])):
        raise SpliceError(f"{data}: labels {ds.label_names} differ from the head's {task.get('labels')} "
                          f"({head_dir / TASK_FILE})")
    encoder, tokenizer = load_model(base, "encoder")
    model = EncoderClassifier(encoder, len(ds.label_names))
    load_head(model, head_dir)
    state = encoder.state_dict()  # shares storage with the parameters: adding to it changes the model
    missing = [n for n in deltas if n not in state]
    if missing:
        raise SpliceError(f"--eval: tensor {missing[0]!r} of the delta is not in the encoder of {base}")
    deltas.apply_to_state_dict(state)
    return accuracy(model.eval(), ds, ClassificationCollator(tokenizer, int(task.get("max_length", 64))),
                    progress=False)
