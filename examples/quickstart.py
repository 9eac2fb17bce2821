"""Prune a LLaVA model's visual tokens with one call, compare with the unpruned model, undo.

Runs offline on a tiny model built from a config; swap in `AutoModelForImageTextToText.from_pretrained(...)` and
`AutoProcessor.from_pretrained(...)` for a real checkpoint.
"""

import torch

import vtprune
from vtprune.cli import scene
from vtprune.testing import tiny_llava

model, processor = tiny_llava("llava", image_size=336)
inputs = processor(images=[scene()], text=["USER: <image>\nWhat colour is the circle? ASSISTANT:"],
                   return_tensors="pt")

vtprune.prune(model, method="fastervlm", keep=64)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    with vtprune.disabled(model):  # A/B in the same process
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
n_in = inputs["input_ids"].shape[1]
print("pruned  :", out[0, n_in:].tolist())
print("unpruned:", ref[0, n_in:].tolist())
print(vtprune.last_report(model))
vtprune.unprune(model)
