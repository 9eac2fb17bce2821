"""Tiny random-weight LLaVA / LLaVA-NeXT models and processors built from configs (no downloads).

Used by the test-suite and the demo; handy for a user's own tests of vtprune on their pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..processors import image_only

IMAGE_TOKEN = "<image>"
_CORPUS = ["USER: describe the picture. ASSISTANT: a red square on a blue background",
           "what colour is the circle? how many shapes are there? where is the triangle? yes no left right top",
           "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9"]


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")


#: per tokenizer kind: (special tokens, named special tokens the processor looks up)
TOKENIZER_SPECIALS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "llava": ((IMAGE_TOKEN,), {"image_token": IMAGE_TOKEN}),
    "qwen2_vl": (QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}),
    "internvl": (INTERNVL_SPECIALS, {"start_image_token": "<img>", "end_image_token": "</img>",
                                     "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}),
}


@functools.cache
def _tokenizer_dir(family: str = "llava", specials: tuple[str, ...] | None = None,
                   named: tuple[tuple[str, str], ...] | None = None) -> str:
    import atexit
    import os
    import shutil
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if specials is None:
        specials, named_map = TOKENIZER_SPECIALS[family]
    else:
        named_map = dict(named or ())
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", *specials], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  extra_special_tokens=named_map)
    tok.padding_side = "left"
    # one directory per process and family: reloading through save_pretrained gives the class users get
    d = os.path.join(tempfile.gettempdir(), f"vtprune_tok_{family}_{os.getpid()}")
    tok.save_pretrained(d)
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def tiny_tokenizer(family: str = "llava", specials: tuple[str, ...] | None = None,
                   named: dict[str, str] | None = None):
    """A tiny byte-level BPE tokenizer (vocab < 512, left padding) saved and reloaded like a real one.

    ``family`` names a kind in ``TOKENIZER_SPECIALS``; a new family passes its own ``specials`` (special tokens,
    e.g. image and marker tokens) and ``named`` (``{"image_token": "<image>", ...}`` attributes its processor reads)
    under a new ``family`` name."""
    from transformers import AutoTokenizer

    key = tuple(sorted(named.items())) if named is not None else None
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(family, tuple(specials) if specials else None, key))
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


def tiny_qwen2_vl(kind: str = "qwen2_vl", text_hidden: int = 128, text_layers: int = 2, vision_depth: int = 2,
                  seed: int = 0, attn_implementation: str = "sdpa", max_tokens: int = 64
                  ) -> tuple[torch.nn.Module, object]:
    """(model, processor) for ``kind`` in {"qwen2_vl", "qwen2_5_vl"}: 28 px per LLM token, 4–64 tokens per image."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_tokenizer("qwen2_vl")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    half = text_hidden // 4 // 2  # M-RoPE sections split head_dim/2 over (t, h, w) in Qwen's 2:3:3 ratio
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = dict(vocab_size=512, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": section})
    common = dict(text_config=text, bos_token_id=1, eos_token_id=2, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    if kind == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=64, hidden_size=text_hidden, num_heads=4, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration._from_config(Qwen2VLConfig(vision_config=vision, **common),
                                                             attn_implementation=attn_implementation)
    elif kind == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=64, out_hidden_size=text_hidden, intermediate_size=128,
                      num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1])
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(vision_config=vision, **common),
                                                                attn_implementation=attn_implementation)
    else:
        raise ValueError(f"kind must be 'qwen2_vl' or 'qwen2_5_vl', got {kind!r}")
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * max_tokens, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    proc = image_only(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok)
    return model.eval(), proc


def tiny_internvl(text_hidden: int = 128, text_layers: int = 2, seed: int = 0, image_size: int = 56,
                  attn_implementation: str = "sdpa", vision_layers: int = 2, vision_hidden: int = 64,
                  max_patches: int = 4) -> tuple[torch.nn.Module, object]:
    """(model, processor): InternViT with [CLS], 56-px tiles (16 patches -> 4 tokens after pixel shuffle); an image
    is cut into up to ``max_patches`` tiles plus a thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = tiny_tokenizer("internvl")
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=4,
                  image_size=[image_size, image_size], patch_size=[14, 14])
    text = dict(model_type="qwen2", vocab_size=512, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    cfg = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    ip = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                  max_patches=max_patches)
    seq = (image_size // 14) ** 2 // 4
    proc = image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=seq)
    return model.eval(), proc


# ---- the tiny model of every family, for tests that run over all of them ---------------------------------------------
@dataclass(frozen=True)
class TinyFamily:
    """How to build a family's tiny random-weight model and which test images suit it.

    ``build(text_layers=, vision_layers=)`` -> (model, processor), float32, eval mode, deterministic weights.
    ``sizes``: (width, height) of three test images, of different sizes where the family takes dynamic resolution,
    tiles or crops, so batches mix layouts.
    """

    build: Callable[..., tuple[torch.nn.Module, Any]]
    sizes: tuple[tuple[int, int], ...]


TINY: dict[str, TinyFamily] = {
    "llava": TinyFamily(lambda **kw: tiny_llava("llava", **kw), ((60, 60), (60, 60), (60, 60))),
    # LLaVA-NeXT: different aspect ratios, so AnyRes grids differ inside one batch
    "llava_next": TinyFamily(lambda **kw: tiny_llava("llava_next", **kw), ((100, 80), (60, 60), (60, 130))),
    # Qwen: dynamic resolution, different token counts per image
    "qwen2_vl": TinyFamily(lambda vision_layers=2, **kw: tiny_qwen2_vl("qwen2_vl", vision_depth=vision_layers, **kw),
                           ((120, 90), (60, 60), (90, 150))),
    "qwen2_5_vl": TinyFamily(lambda vision_layers=2, **kw: tiny_qwen2_vl("qwen2_5_vl", vision_depth=vision_layers,
                                                                          **kw), ((120, 90), (60, 60), (90, 150))),
    # InternVL: tiles + thumbnail, different tile counts per image
    "internvl": TinyFamily(tiny_internvl, ((120, 60), (56, 56), (60, 170))),
}


def tiny_families() -> dict[str, TinyFamily]:
    """HF model_type -> ``TinyFamily``: the ones above and the ``TINY`` dict of every module in this package, so a
    new family adds its builder in a file of its own (``vtprune/testing/<family>.py``) and nothing else."""
    import importlib
    import pkgutil

    out = dict(TINY)
    for mod in pkgutil.iter_modules(__path__):
        out.update(getattr(importlib.import_module(f"{__name__}.{mod.name}"), "TINY", {}))
    return out
