"""Turn a MediaWiki XML dump into plain prose (small, dependency-free cleaner)."""

from __future__ import annotations

import bz2
import html
import io
import re
import xml.etree.ElementTree as ET
from typing import Iterator

_CUT_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
}
# Tags whose whole content is dropped (everything else keeps its inner text).
_DROP_TAGS = (
    "math",
    "gallery",
    "timeline",
    "table",
    "imagemap",
    "score",
    "chem",
    "ce",
    "syntaxhighlight",
    "source",
    "hiero",
    "graph",
    "mapframe",
    "references",
)
_SKIP_LINK_NS = ("file", "image", "category", "media")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_DROP_PAIR = re.compile(r"<(" + "|".join(_DROP_TAGS) + r")\b[^>]*?(?<!/)>.*?</\1\s*>", re.I | re.S)
_BR = re.compile(r"<br\s*/?\s*>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|//|mailto:)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*)\]\]")
_MEDIA_OPEN = re.compile(r"\[\[\s*(?:" + "|".join(_SKIP_LINK_NS) + r")\s*:", re.I)
_INTERLANG = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]+)*:")
_QUOTES = re.compile(r"'{2,5}")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)|(?<=\()\s*[,;]\s*")
_SPACE_PUNCT = re.compile(r"\s+(?=[,.;)])|(?<=\()\s+")
_LETTER = re.compile(r"[^\W\d_]")
_TABLE_OPEN = re.compile(r"^\s*:*\s*\{\|")
_TABLE_CLOSE = re.compile(r"^\s*\|\}")


def iter_pages(xml_text: str) -> Iterator[tuple[str, str]]:
    """Yield (title, wikitext) for non-redirect main-namespace pages."""
    title, ns, text, redirect = None, None, None, False
    for _event, elem in ET.iterparse(io.StringIO(xml_text), events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = (elem.text or "").strip()
        elif tag == "redirect":
            redirect = True
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            if (
                ns == "0"
                and not redirect
                and text is not None
                and not text.lstrip().upper().startswith("#REDIRECT")
            ):
                yield title, text
            title, ns, text, redirect = None, None, None, False
            elem.clear()


def _remove_templates(text: str) -> str:
    """Remove {{...}} (nested, incl. {{{params}}}) with a brace-depth scanner."""
    out, i, n = [], 0, len(text)
    while True:
        start = text.find("{{", i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        depth, j = 0, start
        while j < n:
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth == 0 and j < n:
            i = j + 1
        else:  # unbalanced: drop just the opening braces
            i = start + 2
    return "".join(out)


def _remove_tables(text: str) -> str:
    """Drop {| ... |} blocks (nested) line by line; unclosed openers are dropped alone."""
    lines = text.split("\n")
    keep, i = [], 0
    while i < len(lines):
        if _TABLE_OPEN.match(lines[i]):
            depth, j = 0, i
            while j < len(lines):
                if _TABLE_OPEN.match(lines[j]):
                    depth += 1
                elif _TABLE_CLOSE.match(lines[j]):
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            i = j + 1 if j < len(lines) else i + 1
            continue
        keep.append(lines[i])
        i += 1
    return "\n".join(keep)


def _remove_media_links(text: str) -> str:
    """Drop [[File:..]]/[[Image:..]]/[[Category:..]] whole, counting nested [[ ]] pairs."""
    out, i, n = [], 0, len(text)
    while True:
        m = _MEDIA_OPEN.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i : m.start()])
        depth, j = 0, m.start()
        while j < n:
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    break
            else:
                j += 1
        i = j if depth == 0 else m.end()


def _link_repl(m: re.Match) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    target = target.strip()
    low = target.lower()
    if ":" in low and low.split(":", 1)[0].strip() in _SKIP_LINK_NS:
        return ""
    if not label and _INTERLANG.match(target):
        return ""
    return label.rsplit("|", 1)[-1] if label else target.lstrip(":")


def _replace_links(text: str) -> str:
    """Resolve [[...]] innermost-first, so nested links inside File: captions vanish too."""
    while True:
        new = _INNER_LINK.sub(_link_repl, text)
        if new == text:
            return new
        text = new


def _cut_sections(text: str) -> str:
    for m in re.finditer(r"^[ \t]*=+[ \t]*(.*?)[ \t]*=+[ \t]*$", text, re.M):
        if m.group(1).strip().lower() in _CUT_SECTIONS:
            return text[: m.start()]
    return text


def strip_markup(wikitext: str) -> str:
    """Convert wikitext to plain prose paragraphs separated by blank lines."""
    text = _COMMENT.sub("", wikitext)
    text = _cut_sections(text)
    text = _REF_SELF.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _DROP_PAIR.sub("", text)
    text = _remove_templates(text)
    text = _remove_tables(text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _remove_media_links(text)
    text = _replace_links(text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _QUOTES.sub("", text)
    for tok in ("[[", "]]", "{{", "}}", "{|", "|}"):
        text = text.replace(tok, "")
    text = html.unescape(text)
    paragraphs = []
    for line in text.split("\n"):
        if _HEADING.match(line):
            continue
        line = _LIST_MARK.sub("", line.strip())
        line = " ".join(_EMPTY_PARENS.sub("", line).split())
        line = _SPACE_PUNCT.sub("", line).strip()
        if _LETTER.search(line):
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def load_wikipedia_articles(path) -> list[tuple[str, str]]:
    """Read a (.bz2 or plain) MediaWiki XML dump; return (title, prose) with >= 200 chars."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        xml_text = fh.read()
    articles = []
    for title, wikitext in iter_pages(xml_text):
        prose = strip_markup(wikitext)
        if len(prose) >= 200:
            articles.append((title, prose))
    return articles
