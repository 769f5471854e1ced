"""The rules for names people type (a project's, a label set's, a class's, a dataset's).

A leaf module: the models' field validators (``annotator.models.TypedName``) and the
services use the same words without importing each other.
"""

from __future__ import annotations

import unicodedata

from ml_backend.data.deid import identifier_reason

__all__ = ["UNTYPABLE", "dataset_name_refusal", "name_refusal", "untypable_character",
           "without_untypable"]

# Characters no typed name may hold: Unicode's control characters (Cc: NUL, tab, newline,
# DEL, C1 — those a query parameter may not hold either, medsite/middleware.py), format
# characters (Cf: bidi overrides, zero-width ones) and the line / paragraph separators.
UNTYPABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def untypable_character(text: str) -> str | None:
    """The first character of ``text`` that no name may hold, as ``U+0001``, or None."""
    for char in text or "":
        if unicodedata.category(char) in UNTYPABLE:
            return f"U+{ord(char):04X}"
    return None


def without_untypable(text: str) -> str:
    """``text`` without the characters no name may hold (``untypable_character``): a label
    read from a folder name, a CSV or a findings column, where a zero-width space or a BOM
    is an accident of the file, not something a person typed (the name that is left goes
    through the same checks as a typed one)."""
    return "".join(char for char in text or "" if unicodedata.category(char) not in UNTYPABLE)


def name_refusal(what: str, name: str) -> str | None:
    """Why a typed name (a project's, a label set's, a class's) is refused, or None: one
    holding a control or invisible character could never be filtered on or read back."""
    char = untypable_character(name)
    if char is None:
        return None
    return (f"the {what} name holds a control or invisible character ({char}): type it with "
            "letters, digits, spaces and punctuation only")


def dataset_name_refusal(name: str) -> str | None:
    """Why a dataset name someone typed (upload page, API, ``import_scans --dataset``) is
    refused, or None: one holding a control or invisible character (``untypable_character``:
    such a name could never be filtered on, a query parameter with a control character being
    refused), or one that looks like it carries a patient's identifiers, by the rule for
    file and folder names (``deid.identifier_reason``: ``ward MRN987654``, a date, Doe^John).
    A dataset's name is shown on every page, report and export."""
    char = untypable_character(name)
    if char is not None:
        return (f"the dataset name holds a control or invisible character ({char}): type it "
                "with letters, digits, spaces and punctuation only")
    reason = identifier_reason(name or "", file_name=True)
    if reason is None:
        return None
    return (f"the dataset name looks like it carries patient identifiers ({reason}); "
            "name the site, scanner or collection instead")
