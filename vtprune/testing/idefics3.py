"""Tiny random-weight Idefics3 and SmolVLM models with their processors, built from configs (no downloads).

SigLIP-style tower (h64, image 64, patch 16: 16 patches per tile), scale factor 2 (4 LLM tokens per tile), Llama text
model. The processors split an image into 64-px tiles plus a 64-px global image; images are first resized to a
longest edge of 128 px, so an image has 1 x 2, 2 x 1 or 2 x 2 tiles plus the global one.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch

from . import TinyFamily, _text_config, tiny_tokenizer

IMAGE, FAKE, GLOBAL, EOU = "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"
SPECIALS = (IMAGE, FAKE, GLOBAL, EOU, "<|im_start|>", *(f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)))
NAMED = {"image_token": IMAGE, "fake_image_token": FAKE, "global_image_token": GLOBAL, "end_of_utterance_token": EOU}
TILE, LONGEST = 64, 128


def _smolvlm_processor() -> type:
    """SmolVLM's processor for images only.

    ``SmolVLMProcessor.__init__`` refuses to run without the ``num2words`` package, which only its video prompts use
    (it is not installed here, and the video processor needs torchvision anyway). This subclass sets the attributes
    that ``__init__`` sets (transformers 5.24) and skips that check; the image path is SmolVLM's own code. A flat
    image list with several prompts is split over the prompts by their ``<image>`` counts, as ``Idefics3Processor``
    does (SmolVLM's own reads a flat list as one sample's images).
    """
    from transformers import ProcessorMixin, SmolVLMProcessor
    from transformers.image_utils import is_valid_image

    from ..processors import image_only

    class SmolVLMImagesProcessor(image_only(SmolVLMProcessor)):  # type: ignore[misc]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     image_seq_len: int = 169, **kwargs: Any) -> None:
            for attr, default in (("fake_image_token", FAKE), ("image_token", IMAGE), ("global_image_token", GLOBAL),
                                  ("end_of_utterance_token", EOU), ("video_token", "<video>")):
                setattr(self, attr, getattr(tokenizer, attr, default))
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.image_seq_len = image_seq_len
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def prepare_inputs_layout(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
            if isinstance(text, (list, tuple)) and isinstance(images, (list, tuple)) and images \
                    and is_valid_image(images[0]):
                ends = list(accumulate(t.count(self.image_token) for t in text))
                if ends[-1] == len(images):
                    images = [images[e - n:e] for n, e in zip((t.count(self.image_token) for t in text), ends)]
            return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    return SmolVLMImagesProcessor


def tiny_idefics3(kind: str = "idefics3", text_hidden: int = 128, text_layers: int = 2, vision_layers: int = 2,
                  seed: int = 0, attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, Any]:
    """(model, processor) for ``kind`` in {"idefics3", "smolvlm"}; float32, eval mode, deterministic weights."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    kinds = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil),
             "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil)}
    if kind not in kinds:
        raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
    config_cls, model_cls, ip_cls = kinds[kind]
    tok = tiny_tokenizer("idefics3", specials=SPECIALS, named=NAMED)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=TILE, patch_size=16)
    torch.manual_seed(seed)
    cfg = config_cls(vision_config=vision, text_config=_text_config(512, text_hidden, text_layers, tok.pad_token_id),
                     image_token_id=tok.convert_tokens_to_ids(IMAGE), scale_factor=2)
    model = model_cls._from_config(cfg, attn_implementation=attn_implementation)
    ip = ip_cls(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE})
    seq = (TILE // 16) ** 2 // 4
    proc_cls = Idefics3Processor if kind == "idefics3" else _smolvlm_processor()
    return model.eval(), proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=seq)


# 2 x 1 + global, 2 x 2 + global, 1 x 2 + global tiles: 12, 20, 12 visual tokens in 3, 5, 3 runs
SIZES = ((120, 60), (60, 60), (60, 170))
TINY = {kind: TinyFamily(lambda kind=kind, **kw: tiny_idefics3(kind, **kw), SIZES) for kind in ("idefics3", "smolvlm")}
