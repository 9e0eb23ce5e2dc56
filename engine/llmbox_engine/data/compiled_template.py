"""Chat templates compiled once per role signature, so most conversations render by concatenation.

Running the jinja template costs three renders per assistant turn (the whole conversation, the prefix
with the generation prompt, the conversation up to the turn). But for most templates the output is the
same literal text around each message's content, fixed by the sequence of roles alone. So the template
runs once on a probe conversation with those roles and unique sentinel contents; the output, cut at the
sentinels, gives the literals, and the probe's span boundaries give each span's position relative to
the contents. Any conversation with the same roles then renders as literals and contents joined.

This is only right for templates that copy each content verbatim, once, and do not branch on it. So
the template's syntax tree is read first (`content_is_opaque`): content may only be printed (joined
with + or ~, as either branch of an `x if c else y`) or tested for being empty, directly or through
variables set from it; whether each content is empty is part of the signature. Anything else (a filter,
a method call, a comparison, a macro) leaves the template to jinja. The probe content carries
surrounding whitespace and letters, so a transformation the reading missed shows when the probe is
compiled; and each signature's first conversations, and a sample after that, are compared against the
jinja render. A signature that fails any check renders with jinja from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import jinja2
from jinja2 import nodes

Span = tuple[int, int]
# (content slots before the position, literal characters before it): real position = chars + contents
Boundary = tuple[int, int]
Rendered = tuple[str, list[Span]]
# renders [{"role", "content"}, ...], with or without the generation prompt; may raise
TemplateFn = Callable[[list[dict[str, str]], bool], str]

SENTINEL_OPEN, SENTINEL_CLOSE = "\ue000", "\ue001"  # private-use characters: no template writes them
VERIFY_FIRST = 3  # conversations of each signature always compared against jinja
VERIFY_EVERY = 500  # and every this many after those
_ROLE, _CONTENT = attrgetter("role"), attrgetter("content")


def probe_content(slot: int) -> str:
    # whitespace at both ends and mixed case: trim, upper/lower and escaping all change it visibly
    return f" \n{SENTINEL_OPEN}{slot}{SENTINEL_CLOSE} Probe\n "


@dataclass(frozen=True)
class CompiledConversation:
    literals: tuple[str, ...]  # literals[i] precedes the content of messages[order[i]]; one more at the end
    order: tuple[int, ...]  # which message fills each content slot, in output order
    spans: tuple[tuple[Boundary, Boundary], ...]

    def render(self, contents: Sequence[str]) -> Rendered:
        parts: list[str] = []
        filled = [0]  # characters of content before each slot
        for literal, message in zip(self.literals, self.order, strict=False):
            content = contents[message]
            parts += (literal, content)
            filled.append(filled[-1] + len(content))
        parts.append(self.literals[-1])
        spans = [
            (s_chars + filled[s_slot], e_chars + filled[e_slot]) for (s_slot, s_chars), (e_slot, e_chars) in self.spans
        ]
        return "".join(parts), spans


def compile_conversation(
    roles: Sequence[str], template: TemplateFn, empty: Sequence[bool] | None = None
) -> CompiledConversation | None:
    """The compiled form for conversations with these roles (and these empty contents), or None."""
    empty = empty or [False] * len(roles)
    probe = [
        {"role": role, "content": "" if blank else probe_content(i)}
        for i, (role, blank) in enumerate(zip(roles, empty, strict=True))
    ]
    try:
        full = template(probe, False)
        cut = _cut_at_contents(full, [i for i, e in enumerate(empty) if not e])
        if cut is None:
            return None
        literals, order, slots = cut
        spans = []
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            prefix = template(probe[:i], True)
            upto = full if i == len(roles) - 1 else template(probe[: i + 1], False)
            if not (full.startswith(prefix) and full.startswith(upto)):
                return None  # the template rewrites earlier turns: jinja's search fallback handles it
            start, end = _boundary(len(prefix), slots), _boundary(len(upto), slots)
            if start is None or end is None:
                return None
            spans.append((start, end))
    except Exception:  # the template refuses these roles: jinja raises it again, per record
        return None
    return CompiledConversation(tuple(literals), tuple(order), tuple(spans))


def _cut_at_contents(full: str, messages: list[int]) -> tuple[list[str], list[int], list[Span]] | None:
    """Literals between the probe contents, which message each slot holds, and where each slot lies."""
    found = []
    for message in messages:
        content = probe_content(message)
        at = full.find(content)
        if at < 0 or full.find(content, at + 1) >= 0:
            return None  # dropped or repeated content
        found.append((at, message))
    found.sort()
    literals, order, slots, cursor = [], [], [], 0
    for at, message in found:
        if at < cursor:
            return None
        literals.append(full[cursor:at])
        order.append(message)
        cursor = at + len(probe_content(message))
        slots.append((at, cursor))
    literals.append(full[cursor:])
    if any(SENTINEL_OPEN in lit or SENTINEL_CLOSE in lit for lit in literals):
        return None
    return literals, order, slots


def _boundary(position: int, slots: list[Span]) -> Boundary | None:
    """A probe position as (slots before it, literal characters before it); None inside a content."""
    before, consumed = 0, 0
    for start, end in slots:
        if position <= start:
            break
        if position < end:
            return None
        before, consumed = before + 1, consumed + end - start
    return before, position - consumed


@dataclass
class _Signature:
    compiled: CompiledConversation | None
    seen: int = 0


class ConversationCompiler:
    """Renders conversations through compiled templates, keyed by role signature, checked against jinja."""

    def __init__(self, template: TemplateFn, source: str) -> None:
        self.template = template
        self.enabled = content_is_opaque(source)
        self.signatures: dict[tuple[tuple[str, ...], tuple[bool, ...]], _Signature] = {}

    def render(self, messages: Sequence[Any], jinja: Callable[[], Rendered]) -> Rendered:
        """`messages` have .role and .content; `jinja` renders the same conversation the slow way."""
        if not self.enabled:
            return jinja()
        contents = list(map(_CONTENT, messages))
        key = (tuple(map(_ROLE, messages)), tuple(not c for c in contents))
        signature = self.signatures.get(key)
        if signature is None:
            signature = self.signatures[key] = _Signature(compile_conversation(key[0], self.template, key[1]))
        if signature.compiled is None:
            return jinja()
        signature.seen += 1
        rendered = signature.compiled.render(contents)
        if signature.seen <= VERIFY_FIRST or signature.seen % VERIFY_EVERY == 0:
            expected = jinja()
            if expected != rendered:
                signature.compiled = None  # the template depends on content: jinja for good
                return expected
        return rendered

    @property
    def fallbacks(self) -> list[tuple[str, ...]]:
        """Role sequences that render with jinja (for tests and diagnostics)."""
        return [roles for (roles, _), sig in self.signatures.items() if sig.compiled is None]


# Template features that could hide what is done to content: left to jinja.
_OPAQUE_BREAKERS = (
    nodes.Macro,
    nodes.CallBlock,
    nodes.FilterBlock,
    nodes.AssignBlock,
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
    nodes.Block,
)
_CONSTANT_TESTS = frozenset({"string", "defined", "undefined", "none"})  # constant for a string content


def content_is_opaque(source: str) -> bool:
    """Whether the template only prints message content or tests it for being empty (see the module doc)."""
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError:  # e.g. transformers' {% generation %} tag
        return False
    if next(tree.find_all(_OPAQUE_BREAKERS), None) is not None:
        return False
    tainted = _tainted_names(tree)
    return tainted is not None and _uses_ok(tree, "other", tainted)


def _is_content(node: nodes.Node, tainted: set[str]) -> bool:
    """`x.content`, `x['content']`, or a variable set from one."""
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in tainted


def _tainted_names(tree: nodes.Template) -> set[str] | None:
    """Variables whose value may come from a content; None if one is set in a way not followed."""
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        for assign in tree.find_all(nodes.Assign):
            value = assign.node
            if _is_content(value, tainted) or any(_is_content(n, tainted) for n in value.find_all(nodes.Expr)):
                if not isinstance(assign.target, nodes.Name):
                    return None  # a namespace attribute or an unpacking
                tainted.add(assign.target.name)
        if len(tainted) == before:
            return tainted


def _uses_ok(node: nodes.Node, use: str, tainted: set[str]) -> bool:
    """Whether every content below `node` is printed or tested; `use` is how `node`'s value is used."""
    if _is_content(node, tainted):
        return use in ("print", "test")
    if isinstance(node, nodes.Const):
        return node.value != "content"  # 'content' anywhere else: map(attribute='content'), attr('content')...
    if isinstance(node, nodes.Getattr) and node.attr in ("items", "values", "get"):
        return False  # reads a message without naming its content
    if isinstance(node, nodes.Output):
        return all(_uses_ok(n, "print", tainted) for n in node.nodes)
    if isinstance(node, (nodes.Add, nodes.Concat)):
        inner = "print" if use == "print" else "other"
        return all(_uses_ok(n, inner, tainted) for n in node.iter_child_nodes())
    if isinstance(node, nodes.CondExpr):
        branches = [node.expr1] + ([node.expr2] if node.expr2 is not None else [])
        return _uses_ok(node.test, "test", tainted) and all(_uses_ok(n, use, tainted) for n in branches)
    if isinstance(node, (nodes.And, nodes.Or)):
        return _uses_ok(node.left, use, tainted) and _uses_ok(node.right, use, tainted)
    if isinstance(node, nodes.Not):
        return _uses_ok(node.node, "test" if use != "other" else "other", tainted)
    if isinstance(node, (nodes.If, nodes.For)) and node.test is not None:  # `for ... if test`
        rest = [n for n in node.iter_child_nodes() if n is not node.test]
        return _uses_ok(node.test, "test", tainted) and all(_uses_ok(n, "other", tainted) for n in rest)
    if isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
        return _uses_ok(node.node, "print", tainted)  # the variable's own uses are checked where it is read
    if isinstance(node, nodes.Test) and node.name in _CONSTANT_TESTS and _is_content(node.node, tainted):
        return True
    return all(_uses_ok(n, "other", tainted) for n in node.iter_child_nodes())
