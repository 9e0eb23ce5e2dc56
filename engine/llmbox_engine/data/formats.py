"""The seven dataset formats: how each is recognised and how a record becomes an `Example`.

Detection is per record, by the key that names the format (`messages`, `conversations`, `image`,
`instruction`, `question`, `prompt`, `text`), so a folder or even a file may mix formats. Validation
then demands that format's required fields with the right types, and says which one is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbox_engine.data.canonical import IMAGE_PLACEHOLDER, Example, Message, Origin
from llmbox_engine.data.images import resolve_image


class RecordError(ValueError):
    """What is wrong with one record; the caller adds the file and record number."""


@dataclass(frozen=True)
class RecordContext:
    origin: Origin
    base_dir: Path  # images are resolved relative to the data file's folder


Converter = Callable[[Mapping[str, Any], RecordContext], Example]

_TYPE_NAMES: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _field(record: Mapping[str, Any], name: str, kind: type, fmt: str, *, required: bool = True) -> Any:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(f"missing field {name!r} ({fmt} format)")
        return None
    if not isinstance(value, kind):
        raise RecordError(f"field {name!r} must be {_TYPE_NAMES[kind]}, got {_json_type(value)}")
    return value


def _text(record: Mapping[str, Any], name: str, fmt: str) -> str:
    value: str = _field(record, name, str, fmt)
    if not value.strip():
        raise RecordError(f"field {name!r} is empty ({fmt} format)")
    return value


def _optional_text(record: Mapping[str, Any], name: str, fmt: str) -> str | None:
    value: str | None = _field(record, name, str, fmt, required=False)
    return value


def _alpaca(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    instruction = _text(record, "instruction", "alpaca")
    extra_input = _optional_text(record, "input", "alpaca")
    output = _text(record, "output", "alpaca")
    system = _optional_text(record, "system", "alpaca")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages = [Message("system", system)] if system else []
    messages += [Message("user", prompt), Message("assistant", output)]
    return Example("alpaca", ctx.origin, messages=tuple(messages))


SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
}  # fmt: skip


def _checked_conversation(messages: list[Message], fmt: str) -> tuple[Message, ...]:
    if not any(m.role == "assistant" for m in messages):
        raise RecordError(f"conversation has no assistant turn to learn from ({fmt} format)")
    for i, message in enumerate(messages):
        if message.role == "system" and i > 0:
            raise RecordError(f"turn {i + 1}: a system message may only come first ({fmt} format)")
    return tuple(messages)


def _image(ref: Any, ctx: RecordContext, where: str) -> str:
    """A checked image reference: a path relative to the data file (or absolute), or a data URL."""
    if not isinstance(ref, str) or not ref.strip():
        raise RecordError(f"{where}: an image must be a path or a data: URL, got {_json_type(ref)}")
    try:
        return resolve_image(ref, ctx.base_dir)
    except ValueError as exc:
        raise RecordError(f"{where}: {exc}" if where else str(exc)) from None


def _image_part_ref(part: Mapping[str, Any], where: str) -> Any:
    """OpenAI's {"type": "image_url", "image_url": {"url": ...}} or {"type": "image", "image": path}."""
    if part.get("type") == "image_url":
        inner = part.get("image_url")
        return inner.get("url") if isinstance(inner, dict) else inner
    for key in ("image", "url", "path"):
        if key in part:
            return part[key]
    raise RecordError(f"{where}: an image part needs 'image' (a path) or 'image_url': {{'url': ...}}")


def _content_text(content: Any, where: str, ctx: RecordContext, images: list[str]) -> str:
    """Message content: a string, or OpenAI-style parts; each image part becomes an IMAGE_PLACEHOLDER."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        pieces = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                pieces.append(str(part.get("text", "")))
            elif kind in ("image_url", "image"):
                images.append(_image(_image_part_ref(part, where), ctx, where))
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                raise RecordError(f"{where}: content parts of type {kind!r} are not supported (text, image_url, image)")
        return "".join(pieces)
    raise RecordError(f"{where}: 'content' must be a string, got {_json_type(content)}")


def _checked_images(messages: list[Message], images: list[str], fmt: str) -> tuple[str, ...]:
    """Images only in user turns, one placeholder per image (or none: then they lead the first user turn)."""
    placed = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    if placed and placed != len(images):
        raise RecordError(f"{placed} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s) ({fmt} format)")
    for i, message in enumerate(messages, start=1):
        if message.role != "user" and IMAGE_PLACEHOLDER in message.content and images:
            raise RecordError(f"turn {i}: images may only be in user turns ({fmt} format)")
    return tuple(images)


def _record_images(record: Mapping[str, Any], ctx: RecordContext) -> list[str]:
    """LLaVA-style ShareGPT: `"image": "x.jpg"` (or a list) beside the conversation."""
    value = record.get("image", record.get("images"))
    if value is None:
        return []
    refs = value if isinstance(value, list) else [value]
    return [_image(ref, ctx, "") for ref in refs]


def _sharegpt(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    turns = _field(record, "conversations", list, "sharegpt")
    images = _record_images(record, ctx)
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations turn {i} must be an object, got {_json_type(turn)}")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker is None or value is None:
            missing = "from" if speaker is None else "value"
            raise RecordError(f"conversations turn {i}: missing field {missing!r} (sharegpt format)")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise RecordError(
                f"conversations turn {i}: unknown speaker {speaker!r} (expected one of {sorted(SHAREGPT_ROLES)})"
            )
        messages.append(Message(role, _content_text(value, f"conversations turn {i}", ctx, images)))
    if not messages:
        raise RecordError("field 'conversations' is empty (sharegpt format)")
    checked = _checked_conversation(messages, "sharegpt")
    return Example("sharegpt", ctx.origin, messages=checked, images=_checked_images(messages, images, "sharegpt"))


def _openai(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    raw = _field(record, "messages", list, "openai")
    images: list[str] = []
    messages = []
    for i, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise RecordError(f"messages[{i}] must be an object, got {_json_type(item)}")
        role = item.get("role")
        if role is None or "content" not in item:
            missing = "role" if role is None else "content"
            raise RecordError(f"messages[{i}]: missing field {missing!r} (openai format)")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
        messages.append(Message(role, _content_text(item["content"], f"messages[{i}]", ctx, images)))
    if not messages:
        raise RecordError("field 'messages' is empty (openai format)")
    checked = _checked_conversation(messages, "openai")
    return Example("openai", ctx.origin, messages=checked, images=_checked_images(messages, images, "openai"))


def _qa_answer(record: Mapping[str, Any]) -> str:
    if "answer" in record:
        return _text(record, "answer", "qa")
    answers = record.get("answers")
    if answers is None:
        raise RecordError("missing field 'answer' (qa format)")
    # SQuAD style: {"text": ["first answer", ...], "answer_start": [...]}
    texts = answers.get("text") if isinstance(answers, dict) else answers
    if not isinstance(texts, list) or not texts or not isinstance(texts[0], str):
        raise RecordError("field 'answers' must hold a non-empty list of answer texts (SQuAD style)")
    return texts[0]


def _qa(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    question = _text(record, "question", "qa")
    context = _optional_text(record, "context", "qa")
    answer = _qa_answer(record)
    prompt = f"{context}\n\n{question}" if context and context.strip() else question
    return Example("qa", ctx.origin, messages=(Message("user", prompt), Message("assistant", answer)))


def _completion(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    prompt = _field(record, "prompt", str, "completion")
    completion = _text(record, "completion", "completion")
    return Example("completion", ctx.origin, text=completion, prompt=prompt)


def _text_record(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    return Example("text", ctx.origin, text=_text(record, "text", "text"))


DEFAULT_CAPTION_PROMPT = "Describe this image."


def _vision(record: Mapping[str, Any], ctx: RecordContext) -> Example:
    image = _image(_text(record, "image", "vision"), ctx, "")
    if "caption" in record:
        question, answer = DEFAULT_CAPTION_PROMPT, _text(record, "caption", "vision")
    elif "question" in record:
        question, answer = _text(record, "question", "vision"), _qa_answer(record)
    else:
        raise RecordError("missing field 'caption' (vision format: image + caption, or image + question + answer)")
    messages = (Message("user", question), Message("assistant", answer))
    return Example("vision", ctx.origin, messages=messages, images=(image,))


@dataclass(frozen=True)
class Format:
    name: str
    key: str  # the field whose presence identifies the format
    convert: Converter
    summary: str


# Order matters where records carry several keys: the most specific signature wins.
FORMATS: tuple[Format, ...] = (
    Format("openai", "messages", _openai, "messages: [{role, content}, ...]"),
    Format("sharegpt", "conversations", _sharegpt, "conversations: [{from, value}, ...]"),
    Format("vision", "image", _vision, "image + caption (or image + question + answer)"),
    Format("alpaca", "instruction", _alpaca, "instruction, optional input, output"),
    Format("qa", "question", _qa, "question, answer (or SQuAD answers), optional context"),
    Format("completion", "prompt", _completion, "prompt, completion"),
    Format("text", "text", _text_record, "text (or one example per line of a .txt file)"),
)
FORMATS_BY_NAME = {f.name: f for f in FORMATS}
FORMAT_NAMES = tuple(FORMATS_BY_NAME)


def format_by_name(name: str) -> Format:
    try:
        return FORMATS_BY_NAME[name]
    except KeyError:
        raise RecordError(f"unknown dataset format {name!r} (choose from {', '.join(FORMAT_NAMES)})") from None


def detect_format(record: Mapping[str, Any]) -> Format:
    for fmt in FORMATS:
        if fmt.key in record:
            return fmt
    keys = ", ".join(sorted(map(str, record))) or "none"
    known = "; ".join(f"{f.name}: {f.summary}" for f in FORMATS)
    raise RecordError(f"no known format fits this record (its fields: {keys}). Known formats: {known}")


def convert_record(record: Any, ctx: RecordContext, forced: Format | None = None) -> Example:
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {_json_type(record)}")
    fmt = forced or detect_format(record)
    return fmt.convert(record, ctx)
