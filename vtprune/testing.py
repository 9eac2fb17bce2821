"""Tiny random-weight LLaVA / LLaVA-NeXT models and processors built from configs (no downloads).

Used by the test-suite and the demo; handy for a user's own tests of vtprune on their pipeline.
"""

from __future__ import annotations

import functools

import torch

IMAGE_TOKEN = "<image>"
_CORPUS = ["USER: describe the picture. ASSISTANT: a red square on a blue background",
           "what colour is the circle? how many shapes are there? where is the triangle? yes no left right top",
           "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9"]


@functools.cache
def _tokenizer_dir() -> str:
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.padding_side = "left"
    d = tempfile.mkdtemp(prefix="vtprune_tok_")
    tok.save_pretrained(d)
    return d


def tiny_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    tok.padding_side = "left"
    return tok


def _text_config(vocab: int, hidden: int, layers: int, pad_id: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=pad_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_llava(kind: str = "llava", image_size: int = 56, patch_size: int = 14, vision_hidden: int = 64,
               vision_layers: int = 2, text_hidden: int = 128, text_layers: int = 2, seed: int = 0,
               attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, object]:
    """(model, processor) for ``kind`` in {"llava", "llava_next"}; float32, eval mode, deterministic weights."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden)
    text = _text_config(512, text_hidden, text_layers, tok.pad_token_id)
    torch.manual_seed(seed)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    if kind == "llava":
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        ip = CLIPImageProcessorPil(size=size, crop_size=crop)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    elif kind == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        s = image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        ip = LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        raise ValueError(f"kind must be 'llava' or 'llava_next', got {kind!r}")
    # random init leaves the newline vector at zero-ish scale; give it weight so it matters in tests
    if hasattr(model.model, "image_newline"):
        with torch.no_grad():
            model.model.image_newline.normal_()
    return model.eval(), proc


def tiny_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image with structure (blocks of colour) rather than pure noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    arr = np.pad(arr, ((0, height - arr.shape[0]), (0, width - arr.shape[1]), (0, 0)), mode="edge")
    return Image.fromarray(arr, "RGB")
