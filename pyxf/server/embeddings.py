"""POST /v1/embeddings: sentence embeddings from an encoder model (Model.encode, the model's own
pooling and normalization), as float lists or base64 float32 little-endian bytes."""

import base64

import anyio
import numpy as np
from fastapi import APIRouter, Request

from pyxf.server import errors, schemas
from pyxf.server.registry import EMBED

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


@router.post("/v1/embeddings")
async def embeddings(body: schemas.EmbeddingRequest, request: Request):
    served = request.app.state.registry.get(body.model, EMBED)
    inputs = _inputs(body.input)
    hidden = served.model.config["hidden_size"]
    if body.dimensions is not None and body.dimensions != hidden:
        raise errors.invalid(f"dimensions must be {hidden} for {body.model!r} (it cannot be shortened)",
                             param="dimensions")
    vectors, tokens = await anyio.to_thread.run_sync(_encode, served, inputs)
    return schemas.EmbeddingList(
        model=body.model,
        data=[schemas.Embedding(index=i, embedding=_format(v, body.encoding_format)) for i, v in enumerate(vectors)],
        usage=schemas.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _inputs(value):
    """A string, a list of strings, a list of token ids or a list of token-id lists -> a list of
    str or a list of token-id lists. Token ids are the model's own vocabulary and make the whole
    sequence: no [CLS]/[SEP] is added (as vLLM does)."""
    def fail(message="input must be a string, a list of strings, a list of token ids or a list of token-id lists"):
        return errors.invalid(message, param="input")

    if isinstance(value, str):
        value = [value]
    if value == []:
        raise fail("input must not be empty")
    if not isinstance(value, list):
        raise fail()
    if len(value) > MAX_INPUTS and not all(_is_token_id(t) for t in value):
        raise fail(f"at most {MAX_INPUTS} inputs are allowed per request, got {len(value)}")
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise fail("input strings must not be empty")
        return value
    if all(_is_token_id(t) for t in value):
        return [value]
    if all(isinstance(v, list) and v and all(_is_token_id(t) for t in v) for v in value):
        return value
    raise fail()


def _is_token_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _encode(served, inputs):
    """(embeddings [N, H], prompt tokens); on a worker thread, one call at a time per model."""
    model = served.model
    with served.lock:
        try:
            vectors = model.encode(inputs)
        except (ValueError, TypeError) as e:
            raise errors.invalid(str(e), param="input") from None
    return vectors, _token_count(model, inputs)


def _token_count(model, inputs):
    """Tokens the encoder read: texts tokenized as Model.encode does (cut to the model's max_length)."""
    limit = model.config.get("max_length") or model.context_length
    if isinstance(inputs[0], str):
        return sum(len(ids) for ids, _ in model.tokenizer.encode_for_encoder(inputs, limit))
    return sum(min(len(ids), limit) for ids in inputs)


def _format(vector, encoding_format):
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
