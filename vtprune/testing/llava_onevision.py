"""Tiny random-weight LLaVA-OneVision model and processor built from configs (no downloads).

SigLIP tower (no [CLS]) on 56-px sub-images (4×4 = 16 tokens each), a Qwen2 text model, AnyRes-max-9 as in the
released checkpoints: an image whose unpadded crop map exceeds 1.1² × 9 sub-images of tokens is bilinearly
down-sampled inside the model's packing (the 4×4 crop grid of a large image), smaller ones are not.
"""

from __future__ import annotations

import torch

from ..processors import image_only
from . import TinyFamily, tiny_tokenizer

IMAGE_SIZE = 56
#: (height, width): 1×2, 2×1, 2×2 crops, and 4×4 crops, whose unpadded map is down-sampled (AnyRes-max-9)
PINPOINTS = [[56, 112], [112, 56], [112, 112], [224, 224]]


def tiny_llava_onevision(text_layers: int = 2, vision_layers: int = 2, text_hidden: int = 128, seed: int = 0,
                         attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, object]:
    """(model, processor); float32, eval mode, deterministic weights."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tiny_tokenizer("llava_onevision", specials=("<image>", "<video>", "<|im_start|>", "<|im_end|>"),
                         named={"image_token": "<image>", "video_token": "<video>"})
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                                num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=512, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    with torch.no_grad():  # the init's newline vector is small; give it weight so misplaced newlines show in tests
        model.model.image_newline.normal_()
    ip = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_grid_pinpoints=PINPOINTS)
    proc = image_only(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=(IMAGE_SIZE // 14) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return model.eval(), proc


#: (width, height): a large image (4×4 crops, unpadded to 16×14 tokens, down-sampled to 12×11), a square one
#: (2×2 crops, 8×8) and a tall one (2×1 crops, unpadded), so one batch mixes every packing branch
TINY = {"llava_onevision": TinyFamily(tiny_llava_onevision, ((200, 176), (60, 60), (50, 110)))}
