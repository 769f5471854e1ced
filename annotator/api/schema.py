"""The OpenAPI schema's common parts: every operation documents its errors as problem JSON
(annotator/api/errors.py), so a client (and the schema-driven tests) know every answer."""

from __future__ import annotations

PROBLEM = {
    "type": "object",
    "description": "An error, as RFC 9457 problem details, with a message a person can act on.",
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"},
        "status": {"type": "integer"}, "detail": {"type": "string"},
        "errors": {"type": "object", "additionalProperties": True,
                   "description": "Per field, what is wrong (validation errors only)."}},
    "required": ["title", "status", "detail"],
}
ERRORS = {"400": "The request is not valid: `detail` says why.",
          "401": "No or a wrong token (`Authorization: Token …`).",
          "403": "Not allowed for your role.",
          "404": "No such object among your projects' objects.",
          "429": "Too many requests: wait and try again."}
# an operation with a body: a JSON body over 1 MB, any body over DATA_UPLOAD_MAX_MEMORY_SIZE
TOO_LARGE = {"413": "The body is too large: `detail` gives the limit."}


def add_problem_responses(result, generator, request, public):
    """drf-spectacular post-processing hook: the Problem schema and the error responses."""
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM
    reference = {"$ref": "#/components/schemas/Problem"}
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            codes = dict(ERRORS, **(TOO_LARGE if "requestBody" in operation else {}))
            for code, words in codes.items():
                responses.setdefault(code, {"description": words, "content": {
                    "application/problem+json": {"schema": reference}}})
            # an error a view documents itself (a 409 with its reasons) is problem JSON too
            for code, response in responses.items():
                if str(code)[:1] in "45" and "application/json" in response.get("content", {}):
                    response["content"] = {"application/problem+json": {"schema": reference}}
    return result
