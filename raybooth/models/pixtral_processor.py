"""Mistral3 / Pixtral's processor on the PIL image processor, for machines without torchvision.

    processor = PilPixtralProcessor(PixtralImageProcessorPil(...), tokenizer, patch_size=14,
                                    spatial_merge_size=2, chat_template=tokenizer.chat_template)
    processor(text=["[INST][IMG]Describe.[/INST]"], images=[image], return_tensors="pt")
    # input_ids with the image's token grid, pixel_values (N, C, H, W), image_sizes (N, 2)

transformers 5 declares `PixtralProcessor` as needing torchvision, and its module imports the torchvision
image processor for a helper that token counting alone uses, so the class cannot even be imported
without it, although `PixtralImageProcessorPil` does every image step. This class is the same processor
contract on the PIL image processor: each image is resized so both sides are multiples of
`patch_size * spatial_merge_size` (the tokens the vision tower's patch merger leaves), and its one `[IMG]`
placeholder becomes that grid of tokens, row by row: `[IMG]` per token, `[IMG_BREAK]` after each row,
the last one `[IMG_END]`. `loaders.py` builds it from a checkpoint's own files where `AutoProcessor`
cannot load; with torchvision installed the checkpoint loads transformers' class as usual. Its
`processor_class` is `PixtralProcessor`, so what it saves loads as that class where torchvision is.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin


class PilPixtralProcessor(ProcessorMixin):
    # Default call options, as transformers' PixtralProcessor has them.
    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **_: Any,  # other processor_config.json entries (e.g. processor_class) carry nothing for images
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        missing = [
            t for t in (image_token, image_break_token, image_end_token) if t not in tokenizer.get_vocab()
        ]
        if missing:
            raise ValueError(
                f"the Pixtral processor needs the tokenizer tokens {missing}; the checkpoint's tokenizer "
                "lacks them (set image_token / image_break_token / image_end_token in processor_config.json)"
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    @property
    def token_pixels(self) -> int:
        """Pixels per image token along each side: the tower's patch, merged `spatial_merge_size` times."""
        return self.patch_size * self.spatial_merge_size

    def _process_images(self, images: Any, **kwargs: Any) -> Any:
        # The image processor resizes to multiples of this, so every token covers whole patches.
        kwargs["patch_size"] = self.token_pixels
        return super()._process_images(images, **kwargs)

    def replace_image_token(self, image_inputs: dict[str, Any], image_idx: int, **kwargs: Any) -> str:
        height, width = (int(n) for n in image_inputs["image_sizes"][image_idx])
        rows, columns = height // self.token_pixels, width // self.token_pixels
        row = self.image_token * columns + self.image_break_token
        return (row * rows).removesuffix(self.image_break_token) + self.image_end_token

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        return [*names, "image_sizes"]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "PixtralProcessor"  # transformers' class, where torchvision is installed
        return out
