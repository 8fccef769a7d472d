"""AUTOMATIC1111's prompt weighting, parsed: `(words)` x1.1, `((words))` x1.21, `[words]` /1.1,
`(words:1.3)` x1.3, `\\(` for a literal bracket, and `BREAK` to start a new 75-token chunk.
Pure text logic; pipeline/long_prompts.py applies the weights to the token embeddings.

Prompt editing (`[a:b:0.5]`, `[a:0.5]`), alternation (`[a|b]`) and composition (`a AND b`)
change the prompt while sampling; keyframes refuses them by name (prompt_problems)."""

from __future__ import annotations

import re
from dataclasses import dataclass

UP, DOWN = 1.1, 1 / 1.1  # what one ( ) and one [ ] multiply by
BREAK = "BREAK"
# One token of the syntax per match: an escaped character, a bracket, a ":weight)" closing, a
# run of plain text. A lone ":" is plain text too.
_SYNTAX = re.compile(
    r"\\(?P<escaped>.?)"
    r"|(?P<open>[(\[])"
    r"|:\s*(?P<weight>[+-]?[.\d]+)\s*\)"
    r"|(?P<close>[)\]])"
    r"|(?P<text>[^\\()\[\]:]+|:)",
    re.S,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # 1.0: as written
    breaks: bool = False  # a BREAK: the next fragment starts a new chunk


def parse_weights(prompt: str) -> list[Fragment]:
    """The prompt as (text, weight) runs, neighbours of equal weight merged, as A1111 reads
    it: brackets left open at the end still count; a closing bracket with none open is text."""
    runs: list[list] = []  # [text, weight, breaks]
    open_round: list[int] = []  # where each open bracket's run starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        kind = match.lastgroup
        if kind == "escaped":
            runs.append([match["escaped"], 1.0, False])
        elif kind == "open":
            (open_round if match["open"] == "(" else open_square).append(len(runs))
        elif kind == "weight" and open_round and _number(match["weight"]) is not None:
            scale(open_round.pop(), _number(match["weight"]))
        elif kind == "close" and match["close"] == ")" and open_round:
            scale(open_round.pop(), UP)
        elif kind == "close" and match["close"] == "]" and open_square:
            scale(open_square.pop(), DOWN)
        else:  # text, or a closing the prompt never opened
            for n, part in enumerate(_BREAK.split(match[0])):
                if n:
                    runs.append(["", 1.0, True])
                runs.append([part, 1.0, False])
    for start in open_round:
        scale(start, UP)
    for start in open_square:
        scale(start, DOWN)
    return _merged(runs)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1.2.3": A1111 fails on it; here it stays text
        return None


def _merged(runs: list[list]) -> list[Fragment]:
    merged: list[list] = []
    for text, weight, breaks in runs:
        if not text and not breaks:
            continue  # tokenizes to nothing
        if merged and not breaks and not merged[-1][2] and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight, breaks])
    return [Fragment(t, w, b) for t, w, b in merged] or [Fragment("", 1.0)]


def is_plain(prompt: str) -> bool:
    """Nothing to weight: the text reaches CLIP as written (and is encoded as diffusers does)."""
    fragments = parse_weights(prompt)
    return len(fragments) == 1 and fragments[0].weight == 1.0 and fragments[0].text == prompt


def plain_text(prompt: str) -> str:
    """The words without the weighting syntax: what a scorer compares the image with."""
    text = "".join(" " if f.breaks else f.text for f in parse_weights(prompt))
    return " ".join(text.split())


_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*(?<!\\)[:|][^\[\]]*(?<!\\)\]")
_COMPOSITION = re.compile(r"\bAND\b")


def prompt_problems(prompt: str, what: str) -> list[str]:
    """A1111 syntax that changes the prompt while sampling: refused, by name."""
    problems = []
    if found := _EDITING.search(prompt):
        problems.append(
            f"{what}: {found[0]!r} is A1111's prompt editing or alternation (the prompt changes "
            "while sampling), which keyframes does not do; write the words you want, or "
            "escape the brackets as \\[ \\]"
        )
    if _COMPOSITION.search(prompt):
        problems.append(
            f"{what}: AND is A1111's composable diffusion (several prompts at once), which "
            "keyframes does not do; write 'and' to keep the word"
        )
    return problems
