"""Image-only processors: transformers' multimodal processors without their video processor.

Many VLM processors (Qwen2-VL, Qwen3-VL, InternVL, LLaVA-OneVision, SmolVLM) build a video processor, which needs
torchvision; where torchvision cannot be installed (CPU machines, see ENVIRONMENT.md) the processor cannot be built.
``image_only(Qwen2VLProcessor)`` is the same class without that attribute; a saved one names itself
``Qwen2VLImageOnlyProcessor`` in ``processor_config.json`` and ``processor_class(name)`` finds it again.
"""

from __future__ import annotations

import functools
from typing import Any

SUFFIX = "ImageOnlyProcessor"


@functools.cache
def image_only(base: type) -> type:
    """``base`` (a transformers ``ProcessorMixin`` subclass) without its video processor.

    The subclass's ``__init__`` takes no ``video_processor``, so saving and loading never touch one; every other
    argument (``image_seq_length``, ``chat_template``, ...) goes to ``base`` unchanged.
    """
    name = base.__name__.removesuffix("Processor") + SUFFIX

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        kwargs.pop("video_processor", None)
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    return type(name, (base,), {"__init__": __init__, "__doc__": f"{base.__name__} without its video processor "
                                "(which needs torchvision).", "__module__": __name__})


def processor_class(name: str) -> type | None:
    """The class a saved ``processor_config.json`` names: ``<Base>ImageOnlyProcessor`` is
    ``image_only(<Base>Processor)`` of transformers; None for other names."""
    import transformers

    if not name.endswith(SUFFIX):
        return None
    base = getattr(transformers, name.removesuffix(SUFFIX) + "Processor", None)
    return image_only(base) if base is not None else None
