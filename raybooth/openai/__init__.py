"""The OpenAI surface, Ray-free, shared by the serving app and the batch job (as vLLM keeps its protocol,
chat serving and batch runner side by side).

    from raybooth.openai.protocol import ChatCompletionRequest
    from raybooth.openai.chat import ChatLimits, generation_request_from_chat
    gen_req = generation_request_from_chat(ChatCompletionRequest.model_validate(body), ChatLimits())

- `protocol.py`: every request/response/chunk shape (chat, Batch API lines, images, model list);
- `errors.py`: `APIError`, the one error model, with its OpenAI body and the status -> `type` mapping;
- `chat.py`: chat request -> `GenerationRequest` with every check that needs no HTTP (the `max_tokens`
  budget, images, tool-call formats), and engine result -> `chat.completion`.

It imports `raybooth.models` and `raybooth.cluster`, never Ray, `serving/` or `pipelines/`.
"""
