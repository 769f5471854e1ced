"""The API's JSON parser: the site's one JSON body parser (``medsite.jsonbody``) behind
DRF's parser interface, so an API body meets the limits the label page and the Label Studio
endpoints apply — at most ``jsonbody.MAX_BYTES``, nesting at most ``jsonbody.MAX_DEPTH``
deep, numbers of bounded length and finite, no NUL — and an odd one is a 400 / 413 problem
JSON, never a 500 (DRF's own ``JSONParser`` recurses as deep as the body nests)."""

from __future__ import annotations

from rest_framework import status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import BaseParser

from medsite import jsonbody


class BodyTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = f"the body is larger than the {jsonbody.MAX_BYTES} bytes accepted"
    default_code = "too_large"


class JSONBodyParser(BaseParser):
    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        # one byte more than the limit is enough to know the body is too large
        raw = stream.read(jsonbody.MAX_BYTES + 1) if stream is not None else b""
        if len(raw) > jsonbody.MAX_BYTES:
            raise BodyTooLarge(f"the body is more than {jsonbody.MAX_BYTES} bytes; at most "
                               f"{jsonbody.MAX_BYTES} are accepted")
        try:
            return jsonbody.parse_json(raw, expect=None)
        except jsonbody.BodyError as exc:
            if exc.status == 413:
                raise BodyTooLarge(str(exc)) from None
            raise ParseError(f"JSON parse error: {exc}") from None
