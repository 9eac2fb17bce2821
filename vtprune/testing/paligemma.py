"""Tiny random-weight PaliGemma and Gemma 3 models with their processors (no downloads).

Both use a SigLIP tower (no [CLS]) with 14-px patches. PaliGemma feeds all 16 patches of a 56-px image to a Gemma
(v1) decoder, image tokens first, and marks the prefix with ``token_type_ids``; Gemma 3 average-pools the 64
patches of a 112-px image 2×2 into 16 tokens, wraps every image in begin/end-of-image tokens and runs a Gemma 3 decoder
whose layers mix sliding-window and full attention (window 6, so the test prompts are longer than the window).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyFamily, tiny_tokenizer

#: Gemma 3's image marker tokens and chat-turn tokens, as its tokenizer names them
GEMMA3_SPECIALS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")


def _siglip(hidden: int, layers: int, image_size: int) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, image_size=image_size, patch_size=14)


def tiny_paligemma(text_layers: int = 2, vision_layers: int = 2, text_hidden: int = 128, image_size: int = 56,
                   seed: int = 0, attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, object]:
    """(model, processor): 16 image tokens per image, placed before the ``<bos>`` of the prompt."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tiny_tokenizer("paligemma", specials=("<image>",), named={"image_token": "<image>"})
    n_tokens = (image_size // 14) ** 2
    text = dict(model_type="gemma", vocab_size=512, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = PaliGemmaConfig(vision_config=_siglip(64, vision_layers, image_size), text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=text_hidden,
                          hidden_size=text_hidden, vocab_size=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    ip.image_seq_length = n_tokens  # PaliGemma's processor reads the token count from its image processor
    return model.eval(), PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


def _flat_images(base: type) -> type:
    """``base`` (Gemma3Processor) taking a flat image list in prompt order, as the shared tests give every family's
    processor, besides its own one list per prompt: the images are grouped by each prompt's image placeholders."""

    def prepare_inputs_layout(self: Any, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if isinstance(images, (list, tuple)) and images and not isinstance(images[0], (list, tuple)) \
                and isinstance(text, (list, tuple)) and len(text) > 1:
            it = iter(images)
            images = [[next(it) for _ in range(t.count(self.boi_token))] for t in text]
        return base.prepare_inputs_layout(self, images=images, text=text, **kwargs)

    return type(base.__name__, (base,), {"prepare_inputs_layout": prepare_inputs_layout})


def tiny_gemma3(text_layers: int = 2, vision_layers: int = 2, text_hidden: int = 128, image_size: int = 112,
                sliding_window: int = 6, seed: int = 0, attn_implementation: str = "sdpa"
                ) -> tuple[torch.nn.Module, object]:
    """(model, processor): 16 image tokens per image (2×2 average pool of the 8×8 patch grid) between
    ``<start_of_image>`` / ``<end_of_image>``; decoder layers alternate sliding-window and full attention, last full."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tiny_tokenizer("gemma3", specials=GEMMA3_SPECIALS, named={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    n_tokens = (image_size // 28) ** 2  # 2x2 patches of 14 px per token
    types = ["full_attention" if (i + 1) % 2 == 0 or i == text_layers - 1 else "sliding_attention"
             for i in range(text_layers)]
    text = dict(model_type="gemma3_text", vocab_size=512, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                query_pre_attn_scalar=32, sliding_window=sliding_window, layer_types=types,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = Gemma3Config(vision_config=_siglip(64, vision_layers, image_size), text_config=text,
                       mm_tokens_per_image=n_tokens, image_token_index=ids["<image_soft_token>"],
                       boi_token_index=ids["<start_of_image>"],
                       eoi_token_index=ids["<end_of_image>"], pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    with torch.no_grad():  # the projection starts at zero: give it weight so image tokens matter in tests
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.1)
    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    proc = _flat_images(Gemma3Processor)(image_processor=ip, tokenizer=tok, image_seq_length=n_tokens)
    return model.eval(), proc


TINY = {
    # fixed-resolution SigLIP towers resize every image: the sizes only vary the pictures
    "paligemma": TinyFamily(tiny_paligemma, ((60, 60), (80, 60), (60, 90))),
    "gemma3": TinyFamily(tiny_gemma3, ((60, 60), (80, 60), (60, 90))),
}
