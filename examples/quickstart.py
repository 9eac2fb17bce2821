"""Prune the shipped demo LLaVA's visual tokens with one call, compare with the unpruned model, undo.

Runs offline on the small model the project trains and ships; for a real checkpoint use
`AutoModelForImageTextToText.from_pretrained(...)` and `AutoProcessor.from_pretrained(...)` instead of
`vtprune.demo_model(...)`. Plain user code: no torch.no_grad() needed, generate's own options work as usual.
"""

import vtprune
from vtprune import synth
from vtprune.demo_models import build_prompt

model, processor = vtprune.demo_model("llava")
item = synth.item("heldout", 0)
inputs = processor(images=[item.image], text=[build_prompt("llava", item.qa.question)], return_tensors="pt")

vtprune.prune(model, method="divprune", keep=32)  # 256 -> 32 visual tokens per image
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
with vtprune.disabled(model):  # A/B in the same process
    ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
n_in = inputs["input_ids"].shape[1]
decode = processor.tokenizer.decode
print("question:", item.qa.question, "| expected:", item.qa.answer)
print("pruned  :", decode(out[0, n_in:], skip_special_tokens=True))
print("unpruned:", decode(ref[0, n_in:], skip_special_tokens=True))
print(vtprune.last_report(model))
vtprune.unprune(model)
