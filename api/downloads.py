"""Headers of the responses that hand a file to the client."""

from __future__ import annotations

import re
from urllib.parse import quote

# RFC 5987 attr-char beyond the letters, digits and `_.-~` that quote() always keeps
_ATTR_CHAR_EXTRA = "!#$&+^`|"
# what may stand inside the quoted ASCII fallback: printable ASCII without `"`, `\` and `%` (some clients
# percent-decode the plain parameter)
_UNSAFE_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\%]')


def content_disposition(filename: str, fallback: str = "download") -> str:
    """`attachment` with the name twice: `filename*` (RFC 5987/6266, UTF-8, percent-encoded, for every client
    that reads it) and a plain ASCII `filename` for the others. Any name is safe here: quotes, CR/LF and
    non-Latin characters never reach the header as they are (a header is Latin-1 and one line)."""
    filename = filename or fallback
    encoded = quote(filename.encode("utf-8", "replace"), safe=_ATTR_CHAR_EXTRA)
    ascii_name = _UNSAFE_FALLBACK.sub("_", filename).strip() or fallback
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}"
