"""raybooth: one Ray cluster for bulk multimodal batch inference, DreamBooth fleets and OpenAI-compatible serving."""

__version__ = "0.1.0"
