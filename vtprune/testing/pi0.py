"""A tiny random-weight π0 policy (``PI0ForConditionalGeneration``) with its processor, built offline.

π0 = a PaliGemma VLM (SigLIP tower, Gemma decoder) that encodes the prefix — every camera's SigLIP tokens, then
``<bos>``, the task text and ``\\n`` — once into a KV cache, and a Gemma action expert that denoises an action chunk in
a few flow-matching steps, each attending to that cache layer by layer (so both stacks have the same depth and the
same KV heads × head dim). The processor is transformers' ``PI0Processor``; its own image processor needs torchvision,
which cannot be installed here (ENVIRONMENT §1), so it gets SigLIP's PIL image processor (square resize, the same
0.5 / 0.5 normalisation) with the ``image_seq_length`` attribute ``PI0Processor`` reads.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyFamily, tiny_image, tiny_tokenizer

#: the robot state and action width of the tiny policy (π0 zero-pads real robots' vectors to 32)
STATE_DIM = 8


def tiny_pi0(text_layers: int = 2, vision_layers: int = 2, text_hidden: int = 128, expert_hidden: int = 64,
             image_size: int = 56, chunk: int = 4, steps: int = 2, seed: int = 0,
             attn_implementation: str = "sdpa", vision_hidden: int = 64) -> tuple[torch.nn.Module, Any]:
    """(policy, processor): ``(image_size // 14)²`` SigLIP tokens per camera (16 at 56 px), a Gemma VLM of
    ``text_layers`` layers (``text_hidden`` wide) and an action expert as deep, ``expert_hidden`` wide, predicting
    ``chunk`` actions in ``steps`` denoising steps; float32, eval mode, deterministic weights."""
    from transformers import PI0Config, PI0ForConditionalGeneration, PI0Processor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tiny_tokenizer("pi0", specials=("<image>",), named={"image_token": "<image>"})
    ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    ip.image_seq_length = (image_size // 14) ** 2  # PI0Processor reads the tokens per camera from its image processor
    # the processor adds π0's 1024 <locNNNN> and 128 <segNNN> tokens to the tokenizer: the vocabulary must hold them
    proc = PI0Processor(image_processor=ip, tokenizer=tok, max_state_dim=STATE_DIM, chunk_size=chunk)
    vocab = 2048
    assert len(proc.tokenizer) <= vocab
    head = dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)  # both stacks share the cache's KV shape
    text = dict(model_type="gemma", vocab_size=vocab, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, max_position_embeddings=4096, pad_token_id=tok.pad_token_id, **head)
    vision = dict(model_type="siglip_vision_model", hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size, patch_size=14,
                  vision_use_head=False)
    vlm = dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=text_hidden,
               image_token_id=proc.image_token_id, vocab_size=vocab, pad_token_id=tok.pad_token_id)
    expert = dict(model_type="gemma", hidden_size=expert_hidden, intermediate_size=2 * expert_hidden,
                  num_hidden_layers=text_layers, max_position_embeddings=4096, **head)
    cfg = PI0Config(vlm_config=vlm, dit_config=expert, chunk_size=chunk, max_state_dim=STATE_DIM,
                    max_action_dim=STATE_DIM, num_inference_steps=steps)
    torch.manual_seed(seed)
    model = PI0ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval(), proc


def policy_inputs(proc: Any, cameras: list[int], task: str | list[str] = "pick up the red cube",
                  image_size: tuple[int, int] = (60, 60), seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor output for one sample per entry of ``cameras`` (that many camera images, the other camera slots
    absent: ``pixel_attention_mask`` False, no image tokens), padded to the longest prompt, plus a random robot
    ``state`` [B, STATE_DIM]; images and state are deterministic in ``seed``."""
    tasks = [task] * len(cameras) if isinstance(task, str) else list(task)
    images = [[tiny_image(*image_size, seed=seed + 10 * b + c) for c in range(n)] for b, n in enumerate(cameras)]
    out = dict(proc(images=images, text=tasks, padding="longest", return_tensors="pt"))
    gen = torch.Generator().manual_seed(seed)
    out["state"] = torch.randn(len(cameras), STATE_DIM, generator=gen)
    return out


def fixed_noise(model: torch.nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    """The flow-matching start noise [batch, chunk, action dim] for reproducible ``sample_actions`` calls."""
    cfg = model.config
    return torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=torch.Generator().manual_seed(seed))


TINY = {
    # SigLIP resizes every camera image to its fixed square: the sizes only vary the pictures
    "pi0": TinyFamily(tiny_pi0, ((60, 60), (80, 60), (60, 90))),
}
