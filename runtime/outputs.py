"""What each task's output array holds, by task kind: the one table the compiler writes into the
manifest (``tasks[].values``), ``taskfold predict --help`` prints and the runtime docs quote.

Outputs are the network's raw answers: logits, not probabilities; surface normals are not
normalised to unit length. Callers apply the last step themselves (softmax/argmax, sigmoid,
division by the norm), as the training losses and metrics do.
"""
from __future__ import annotations

OUTPUT_VALUES: dict[str, str] = {
    "segmentation": "class logits per pixel (N, classes, H, W); argmax over axis 1 = class, softmax = probabilities",
    "classification": "class logits (N, classes); argmax = class, softmax = probabilities",
    "edges": "edge logits per pixel (N, 1, H, W); sigmoid = edge probability",
    "saliency": "saliency logits per pixel (N, 1, H, W); sigmoid = probability",
    "attributes": "one logit per attribute (N, A); sigmoid = each attribute's probability",
    "depth": "depth per pixel (N, 1, H, W) in the training labels' units "
             "(relative, up to scale and shift, when trained with loss: ssi)",
    "disparity": "disparity per pixel (N, 1, H, W) in the training labels' units",
    "normals": "surface normal per pixel (N, 3, H, W), camera frame, NOT unit length: divide by its norm over axis 1",
}


def output_values(kind: str) -> str:
    """What an output of task kind ``kind`` holds (a generic phrase for kinds without an entry)."""
    return OUTPUT_VALUES.get(kind, "the network's raw output for this task")
