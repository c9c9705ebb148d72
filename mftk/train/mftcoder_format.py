"""MFTCoder's data formats and template (`data.template: mftcoder`), as segments of text.

MFTCoder (`mftcoder_accelerate`, sft mode) detects a record's format by its keys, in this order:
a (prompt, answer) pair of one of PAIRS (with an optional "system"), then "chat_rounds" (a
non-empty list), then "text". Every content gets "\\n" appended (and U+202F / U+00A0 become
spaces), and each piece below is tokenized on its own; `{eos}` is the tokenizer's eos token id,
appended as an id, not as text. With markers S, U, A (default "<s>system\\n", "<s>human\\n",
"<s>bot\\n"; `data.role_markers` changes them), loss on the pieces marked *:

- chat_rounds: an optional first system turn `S{system}\\n`; then turns that alternate
  human|user / bot|assistant|gpt, starting with human: `U{human}\\nA`, then `{bot}\\n` + `{eos}`
  (* both) and a separate `\\n` without loss;
- pair: `[S{system}\\n]U{prompt}\\nA`, then `{answer}\\n` + `{eos}` (*);
- text: `{text}\\n` + `{eos}` (*).

So a two-round chat reads `S…\\nU…\\nA…\\n{eos}\\nU…\\nA…\\n{eos}\\n`, the string MFTCoder's own
inference template (its tokenizer's chat_template) produces. A role sequence MFTCoder rejects
(a bot turn first, two bot or two human turns in a row, a system turn after the first, an unknown
role) raises ValueError here; an empty bot turn is accepted, as MFTCoder accepts it.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MARKERS = {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"}
HUMAN_ROLES = ("human", "user")
BOT_ROLES = ("bot", "assistant", "gpt")
# (prompt key, answer key) in MFTCoder's detection order
PAIRS = (
    ("prompt", "answer"),
    ("prompt", "response"),
    ("input", "output"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
)

Segments = list[tuple[str, bool]]


def content_format(content: str) -> str:
    """MFTCoder's content_format: narrow/no-break spaces become spaces, then a newline."""
    return content.replace("\u202f", " ").replace("\xa0", " ") + "\n"


def markers_of(role_markers: dict[str, str] | None) -> dict[str, str]:
    """The (system, user, assistant) markers: MFTCoder's defaults, or data.role_markers."""
    return dict(DEFAULT_MARKERS if role_markers is None else role_markers)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def chat_segments(rounds: Any, eos: str, markers: dict[str, str]) -> Segments:
    """Segments of a chat_rounds list, with MFTCoder's role checks (see the module docstring)."""
    if not isinstance(rounds, list) or not rounds:
        raise ValueError("'chat_rounds' must be a non-empty list")
    for k, turn in enumerate(rounds):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"chat_rounds[{k}] must be an object with 'role' and 'content'")
        _string(turn["role"], f"chat_rounds[{k}].role")
        _string(turn["content"], f"chat_rounds[{k}].content")
    segs: Segments = []
    start = 0
    if rounds[0]["role"] == "system":
        segs.append((markers["system"] + content_format(rounds[0]["content"]), False))
        start = 1
    for k in range(start, len(rounds)):
        role, content = rounds[k]["role"], content_format(rounds[k]["content"])
        human_turn = (k - start) % 2 == 0
        if (role in HUMAN_ROLES) != human_turn:
            want = "human/user" if human_turn else "bot/assistant"
            raise ValueError(
                f"chat_rounds[{k}].role: {role!r} where a {want} turn belongs (MFTCoder: an "
                "optional first system turn, then human and bot turns alternating, human first)"
            )
        if role in HUMAN_ROLES:
            segs.append((markers["user"] + content + markers["assistant"], False))
        elif role in BOT_ROLES:
            segs += [(content, True), (eos, True), ("\n", False)]
        else:
            where = "only as the first turn" if role == "system" else "not supported"
            raise ValueError(
                f"chat_rounds[{k}].role: {role!r} {where} (MFTCoder's roles: system first, then "
                f"{'/'.join(HUMAN_ROLES)} and {'/'.join(BOT_ROLES)})"
            )
    return segs


def pair_segments(
    system: Any, prompt: Any, answer: Any, keys: tuple[str, str], eos: str, markers: dict[str, str]
) -> Segments:
    """Segments of a prompt/answer record (keys: the record's names of the two, for errors)."""
    _string(prompt, f"'{keys[0]}'")
    _string(answer, f"'{keys[1]}'")
    head = ""
    if system:
        head = content_format(markers["system"] + _string(system, "'system'"))
    head += markers["user"] + content_format(prompt) + markers["assistant"]
    return [(head, False), (content_format(answer), True), (eos, True)]


def text_segments(text: Any, eos: str) -> Segments:
    """Segments of a pretraining text record: every token carries loss."""
    return [(content_format(_string(text, "'text'")), True), (eos, True)]


def record_kind(rec: dict, extra_pair: tuple[str, str] | None = None) -> str | tuple[str, str]:
    """MFTCoder's format of a record: a (prompt key, answer key) pair, "chat_rounds" or "text".
    extra_pair (e.g. the task's prompt/completion keys) is tried after MFTCoder's own pairs."""
    for pair in PAIRS + ((extra_pair,) if extra_pair else ()):
        if pair[0] in rec and pair[1] in rec:
            return pair
    if "chat_rounds" in rec and rec["chat_rounds"] not in ([], ""):
        return "chat_rounds"
    if "text" in rec:
        return "text"
    pairs = ", ".join("/".join(p) for p in PAIRS)
    raise ValueError(
        f"no MFTCoder format: expected 'chat_rounds', 'text', or one of the pairs {pairs}"
        f" (keys: {sorted(rec)})"
    )


def record_segments(
    rec: dict, kind: str | tuple[str, str], eos: str, markers: dict[str, str]
) -> Segments:
    """Segments of a record of a kind given by record_kind (or forced by the task's format)."""
    if kind == "chat_rounds":
        if "chat_rounds" not in rec:
            raise ValueError("missing key 'chat_rounds'")
        return chat_segments(rec["chat_rounds"], eos, markers)
    if kind == "text":
        return text_segments(rec["text"], eos)
    for key in kind:
        if key not in rec:
            raise ValueError(f"missing key '{key}'")
    return pair_segments(rec.get("system"), rec[kind[0]], rec[kind[1]], kind, eos, markers)


def inference_prompt(prompt: str, markers: dict[str, str], system: str | None = None) -> str:
    """The text to generate from, as MFTCoder's inference template writes a one-turn chat:
    `[S{system}\\n]U{prompt}\\nA` (the model then writes the answer and its eos)."""
    head = markers["system"] + content_format(system) if system else ""
    return head + markers["user"] + content_format(prompt) + markers["assistant"]
