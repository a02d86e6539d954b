"""Which rows of a loaded file could fail ``module._row_problem``, computed on the Arrow columns at once.

``load_rows`` checks every row with the Python function ``_row_problem`` (one error message per kind of problem);
that costs a Python dict per row. When the columns have the plain types (strings; ``messages`` a list of
``{role, content}`` structs of strings), :func:`suspect_rows` flags, with Arrow compute over whole columns, every row
for which ``_row_problem`` might say something: a missing or empty field, a ``messages`` turn without a role or
content or with an empty role, a conversation without an assistant turn or not ending with one. Only the flagged
rows then go through ``_row_problem``, so the first problem found is the same as row by row, with the same message.
Any other column type gives ``None``: check every row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_STRING = (pa.string(), pa.large_string(), pa.null())


def _is_string(t: pa.DataType) -> bool:
    return any(t == s for s in _STRING)


def _messages_ok(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return t == pa.null()
    turn = t.value_type
    if not pa.types.is_struct(turn):
        return False
    names = [turn.field(i).name for i in range(turn.num_fields)]
    return all(k in names and _is_string(turn.field(k).type) for k in ("role", "content"))


def _np(arr) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def suspect_rows(table: pa.Table, prompts_only: bool, chat_answer: bool) -> np.ndarray | None:
    """Indices of the rows to check one by one (conservative), or ``None`` when every row must be checked."""
    n = table.num_rows
    cols = set(table.column_names)
    for name in ("text", "prompt", "response", "domain"):
        if name in cols and not _is_string(table.schema.field(name).type):
            return None
    if "messages" in cols and not _messages_ok(table.schema.field("messages").type):
        return None

    def present(name: str) -> np.ndarray:
        if name not in cols:
            return np.zeros(n, dtype=bool)
        return _np(pc.is_valid(table.column(name)))

    def empty(name: str) -> np.ndarray:  # a present, empty string
        if name not in cols or table.schema.field(name).type == pa.null():
            return np.zeros(n, dtype=bool)
        return _np(pc.fill_null(pc.equal(pc.binary_length(table.column(name)), 0), False))

    has_text, has_prompt, has_messages = present("text"), present("prompt"), present("messages")
    is_text = has_text
    is_pair = ~has_text & has_prompt
    is_chat = ~has_text & ~has_prompt & has_messages
    bad = ~(is_text | is_pair | is_chat)
    bad |= is_text & empty("text")
    bad |= is_pair & empty("prompt")
    if not prompts_only:
        bad |= is_pair & (~present("response") | empty("response"))
    if is_chat.any() and table.schema.field("messages").type != pa.null():
        bad |= is_chat & _chat_suspects(table.column("messages").combine_chunks(), n, chat_answer)
    return np.flatnonzero(bad)


def _chat_suspects(messages: pa.Array, n: int, chat_answer: bool) -> np.ndarray:
    lengths = np.asarray(pc.fill_null(pc.list_value_length(messages), 0).to_numpy(zero_copy_only=False))
    turns = messages.flatten()  # the turns of the valid rows, in order
    owner = np.repeat(np.arange(n), lengths)
    role, content = pc.struct_field(turns, "role"), pc.struct_field(turns, "content")
    turn_bad = (_np(pc.is_null(turns)) | _np(pc.is_null(role)) | _np(pc.is_null(content)) |
                _np(pc.fill_null(pc.equal(pc.binary_length(role), 0), True)))
    bad = lengths == 0
    np.logical_or.at(bad, owner[turn_bad], True)
    if chat_answer and len(turns):
        is_assistant = _np(pc.fill_null(pc.equal(role, "assistant"), False))
        any_assistant = np.zeros(n, dtype=bool)
        np.logical_or.at(any_assistant, owner[is_assistant], True)
        last = np.cumsum(lengths) - 1
        ends = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(lengths > 0)
        ends[rows] = is_assistant[last[rows]]
        bad |= ~any_assistant | ~ends
    elif chat_answer:
        bad |= True
    return bad


__all__ = ["suspect_rows"]
