"""Tiny random-weight Qwen3-VL (``qwen3_vl``) and Qwen3-VL-MoE (``qwen3_vl_moe``) models and processors.

32 px per LLM token (patch 16, 2x2 merge), 4-64 tokens per image; DeepStack features from the first two ViT blocks
(fewer when the tower is shallower) are added after the first two decoder layers, as in the real models (which
take them from three intermediate blocks).
"""

from __future__ import annotations

import torch

from ..processors import image_only
from . import QWEN_SPECIALS, TinyFamily, tiny_tokenizer

#: the named tokens Qwen3VLProcessor reads from its tokenizer
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
         "vision_end_token": "<|vision_end|>"}


def tiny_qwen3_vl(kind: str = "qwen3_vl", text_hidden: int = 128, text_layers: int = 2, vision_layers: int = 2,
                  seed: int = 0, attn_implementation: str = "sdpa", max_tokens: int = 64
                  ) -> tuple[torch.nn.Module, object]:
    """(model, processor) for ``kind`` in {"qwen3_vl", "qwen3_vl_moe"}; float32, eval mode, deterministic weights."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_tokenizer("qwen3_vl", specials=QWEN_SPECIALS, named=NAMED)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = 32  # interleaved M-RoPE sections (t, h, w) must add up to head_dim / 2
    text = dict(vocab_size=512, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=text_hidden // head_dim, num_key_value_heads=2,
                head_dim=head_dim, max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    vision = dict(depth=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(min(2, vision_layers))))
    common = dict(vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    if kind == "qwen3_vl":
        model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(text_config=text, **common),
                                                             attn_implementation=attn_implementation)
    elif kind == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_hidden, decoder_sparse_step=1)
        model = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig(text_config=text, **common),
                                                                attn_implementation=attn_implementation)
    else:
        raise ValueError(f"kind must be 'qwen3_vl' or 'qwen3_vl_moe', got {kind!r}")
    ip = Qwen2VLImageProcessorPil(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * max_tokens, patch_size=16,
                                  merge_size=2, temporal_patch_size=2)
    proc = image_only(Qwen3VLProcessor)(image_processor=ip, tokenizer=tok)
    return model.eval(), proc


# dynamic resolution: 4 x 3, 2 x 2 and 3 x 5 LLM tokens
_SIZES = ((128, 96), (64, 64), (96, 160))
TINY = {kind: TinyFamily(lambda kind=kind, **kw: tiny_qwen3_vl(kind, **kw), _SIZES)
        for kind in ("qwen3_vl", "qwen3_vl_moe")}
