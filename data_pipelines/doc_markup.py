"""Prose paragraphs of documentation markup: HTML, reStructuredText, POD.

What `data_pipelines.debian_docs` keeps of a documentation file before it
splits sentences (`english_sentences`):

* HTML (stdlib `html.parser`, `html_paragraphs`): `<head>`, scripts, styles,
  `<pre>`, tables, navigation, headers/footers, sidebars, code listings and
  API signatures (by tag, class, role or id, see `SKIP_TAGS`,
  `SKIP_CLASS_RE`) are removed; block elements end paragraphs;
* reStructuredText (Sphinx `_sources/*.rst.txt`) and plain text
  (`rst_paragraphs`): comments, code-like directives (`code-block`,
  `kernel-doc`, `toctree`, tables, ...) and literal blocks (after `::`),
  doctests, tables, section adornments and option-list lines are removed,
  the bodies of prose directives (`note`, `function`, `versionadded`, ...)
  kept, inline markup reduced to its text (`` :ref:`Title <label>` `` ->
  `Title`);
* POD (`perl-doc`, `pod_paragraphs`): commands give headings/items,
  verbatim paragraphs are dropped, formatting codes reduced to their text.

`document_paragraphs` picks the format by file name.
"""

import html
import html.parser
import re
from typing import List, Optional

BLOCK_TAGS = frozenset(
    "p div li ul ol dl dt dd h1 h2 h3 h4 h5 h6 br hr tr td th blockquote"
    " section article aside caption figcaption body main center".split()
)
SKIP_TAGS = frozenset(
    "head script style pre table nav header footer form select button"
    " textarea svg math noscript iframe object map sup".split()
)
SKIP_CLASS_RE = re.compile(
    r"(?:^|\s)(?:sphinxsidebar\w*|related|footer|header|navigation|nav\w*"
    r"|toc\w*|breadcrumbs?|headerlink|highlight[\w-]*|sig(?:nature)?"
    r"|sourceCode|programlisting|screen|synopsis|cmdsynopsis|funcsynopsis"
    r"|literallayout|example-contents|doctest|rst-footer-buttons|sidebar"
    r"|menu|footnotes?|index|contents|topic|example|lilypond\w*"
    r"|rustdoc-toggle|mobile-topbar|sidebar-elems|search\w*)(?:\s|$)"
)
SKIP_ID_RE = re.compile(
    r"^(?:sidebar|toc|nav\w*|footer|header|searchbox|menu|breadcrumbs?)$"
)
VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track"
    " wbr".split()
)


class _HtmlText(html.parser.HTMLParser):
  """Collects the paragraphs of an HTML page outside skipped elements."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.paragraphs: List[str] = []
    self._buffer: List[str] = []
    self._skip_tag: Optional[str] = None
    self._skip_depth = 0

  def _flush(self):
    text = " ".join("".join(self._buffer).split())
    if text:
      self.paragraphs.append(text)
    self._buffer = []

  def handle_starttag(self, tag, attrs):
    if tag in VOID_TAGS:
      if self._skip_tag is None and tag in BLOCK_TAGS:
        self._flush()
      return
    if self._skip_tag is not None:
      if tag == self._skip_tag:
        self._skip_depth += 1
      return
    attributes = dict(attrs) if tag not in ("html", "body") else {}
    if (
        tag in SKIP_TAGS
        or SKIP_CLASS_RE.search(attributes.get("class") or "")
        or SKIP_ID_RE.match(attributes.get("id") or "")
        or attributes.get("role") in ("navigation", "search", "banner")
    ):
      self._flush()
      self._skip_tag = tag
      self._skip_depth = 1
      return
    if tag in BLOCK_TAGS:
      self._flush()

  def handle_startendtag(self, tag, attrs):
    if self._skip_tag is None and tag in BLOCK_TAGS:
      self._flush()

  def handle_endtag(self, tag):
    if self._skip_tag is not None:
      if tag == self._skip_tag:
        self._skip_depth -= 1
        if self._skip_depth == 0:
          self._skip_tag = None
      return
    if tag in BLOCK_TAGS:
      self._flush()

  def handle_data(self, data):
    if self._skip_tag is None:
      self._buffer.append(data)

  def close(self):
    super().close()
    self._flush()


def html_paragraphs(text: str) -> List[str]:
  """Prose paragraphs of an HTML page (module docstring).

  Args:
    text: the page.

  Returns:
    Paragraphs with whitespace collapsed.
  """
  parser = _HtmlText()
  parser.feed(text)
  parser.close()
  return parser.paragraphs


# Directives whose body is prose (kept); every other directive is dropped
# with its indented body.
PROSE_DIRECTIVES = frozenset(
    "note warning seealso tip important attention caution danger error hint"
    " admonition versionadded versionchanged deprecated function method"
    " class attribute data exception decorator decoratormethod classmethod"
    " staticmethod describe object module currentmodule py:function py:method"
    " py:class py:attribute py:data py:exception py:module c:function"
    " c:macro c:type c:member c:var c:struct c:union c:enum c:enumerator"
    " cpp:function cpp:class cpp:type cpp:member envvar option cmdoption"
    " program rst:directive rst:role confval event opcode abstractmethod"
    " coroutinefunction coroutinemethod glossary topic sidebar rubric only"
    " container compound centered hlist".split()
)
# Directives whose argument on the directive line is text
# ('.. note:: Text.'); the version directives' argument starts with a version.
VERSION_DIRECTIVES = frozenset(("versionadded", "versionchanged", "deprecated"))
INLINE_TEXT_DIRECTIVES = VERSION_DIRECTIVES | frozenset(
    "note warning tip important attention caution danger hint"
    " seealso".split()
)
_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(.*)$")
_COMMENT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT_RE = re.compile(r"^\s*([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
_SIMPLE_TABLE_RE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_GRID_TABLE_RE = re.compile(r"^\s*[+|]")
_OPTION_LINE_RE = re.compile(r"^\s*--?[A-Za-z0-9][\w-]*(?:[ =]\S+)?(\s{2,}|$)")
_FIELD_RE = re.compile(r"^\s*:[^:`\s][^:`]*:(\s+|$)")
_BULLET_RE = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)]|#\.|\(\w\))\s+")
_ROLE_TARGET_RE = re.compile(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`")
_ROLE_RE = re.compile(r":[\w:.+-]+:`[~!]?([^`]*)`")
_LINK_RE = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_LITERAL_RE = re.compile(r"``([^`]*)``")
_INTERPRETED_RE = re.compile(r"`([^`]*)`_{0,2}")
_EMPHASIS_RE = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_FOOTNOTE_REF_RE = re.compile(r"\s*\[(?:#\w*|\*|\d+)\]_")
_SUBSTITUTION_RE = re.compile(r"\|([^|\s][^|]*)\|_{0,2}")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def rst_inline(text: str) -> str:
  """reST inline markup reduced to its text."""
  text = _ROLE_TARGET_RE.sub(r"\1", text)
  text = _ROLE_RE.sub(r"\1", text)
  text = _LINK_RE.sub(r"\1", text)
  text = _LITERAL_RE.sub(r"\1", text)
  text = _INTERPRETED_RE.sub(r"\1", text)
  text = _EMPHASIS_RE.sub(lambda m: m.group(1) or m.group(2), text)
  text = _FOOTNOTE_REF_RE.sub("", text)
  text = _SUBSTITUTION_RE.sub(r"\1", text)
  return text.replace("\\ ", "").replace("\\", "")


def rst_paragraphs(text: str) -> List[str]:
  """Prose paragraphs of reStructuredText or plain text (module docstring).

  Args:
    text: the document.

  Returns:
    Paragraphs (inline markup reduced to text, whitespace collapsed).
  """
  lines = text.expandtabs(8).splitlines()
  paragraphs: List[str] = []
  current: List[str] = []
  literal_indent = None
  para_indent = 0

  def flush():
    joined = " ".join(" ".join(current).split())
    if joined:
      paragraphs.append(rst_inline(joined))
    current.clear()

  def skip_block(start: int, indent: int) -> int:
    """Index of the first line after the block indented more than indent."""
    j = start
    while j < len(lines) and (
        not lines[j].strip() or _indent(lines[j]) > indent
    ):
      j += 1
    return j

  def skip_paragraph(start: int) -> int:
    """Index of the first blank line at or after start (or the end)."""
    j = start
    while j < len(lines) and lines[j].strip():
      j += 1
    return j

  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    if not stripped:
      flush()
      i += 1
      continue
    if literal_indent is not None:
      # The literal block: lines indented more than the paragraph that
      # ended with '::'.
      indent, literal_indent = literal_indent, None
      if _indent(line) > indent:
        i = skip_block(i, indent)
        continue
    directive = _DIRECTIVE_RE.match(line)
    if directive:
      flush()
      name = directive.group(2).lower()
      indent = _indent(line)
      if name in PROSE_DIRECTIVES:
        rest = directive.group(3).strip()
        i += 1
        # Options (':opt: value') directly after the directive line.
        while i < len(lines) and _FIELD_RE.match(lines[i]):
          i += 1
        if name in VERSION_DIRECTIVES:
          rest = " ".join(rest.split()[1:])  # drop the version number
        if rest and name in INLINE_TEXT_DIRECTIVES:
          current.append(rest)
        continue
      i = skip_block(i + 1, indent)
      continue
    if _COMMENT_RE.match(line):
      flush()
      i = skip_block(i + 1, _indent(line))
      continue
    if stripped.startswith(">>>"):
      flush()
      i = skip_paragraph(i)
      continue
    if _SIMPLE_TABLE_RE.match(line):
      flush()
      i += 1
      while i < len(lines):
        if _SIMPLE_TABLE_RE.match(lines[i]) and (
            i + 1 >= len(lines) or not lines[i + 1].strip()
        ):
          i += 1
          break
        i += 1
      continue
    if _ADORNMENT_RE.match(line):
      flush()
      i += 1
      continue
    if _GRID_TABLE_RE.match(line) and (
        stripped.startswith("+-") or stripped.startswith("+=")
    ):
      flush()
      i = skip_paragraph(i)
      continue
    if _OPTION_LINE_RE.match(line):
      flush()
      i += 1
      continue
    bullet = _BULLET_RE.match(line)
    if bullet:
      flush()
      line = line[bullet.end() :]
    field = _FIELD_RE.match(line)
    if field:
      flush()
      line = line[field.end() :]
    if line.rstrip().endswith("::"):
      body = line.rstrip()[:-2].rstrip()
      if not current:
        para_indent = _indent(lines[i])
      current.append(body + ":" if body else "")
      flush()
      literal_indent = para_indent
      i += 1
      continue
    if not current:
      para_indent = _indent(lines[i])
    current.append(line)
    i += 1
  flush()
  return paragraphs


_POD_CODE_RE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_MULTI_RE = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(match: re.Match) -> str:
  code, body = match.group(1), match.group(2)
  if code in ("X", "Z"):
    return ""
  if code == "E":
    if body.isdigit():
      return chr(int(body))
    return _POD_ESCAPES.get(body, html.unescape(f"&{body};"))
  if code == "L":
    body = body.split("|", 1)[0] if "|" in body else body
    return body.replace("/", " ").replace('"', "").strip()
  return body


def pod_inline(text: str) -> str:
  """POD formatting codes reduced to their text."""
  text = _POD_MULTI_RE.sub(_pod_code, text)
  previous = None
  while previous != text:
    previous = text
    text = _POD_CODE_RE.sub(_pod_code, text)
  return text


def pod_paragraphs(text: str) -> List[str]:
  """Prose paragraphs of a POD document.

  Args:
    text: the document.

  Returns:
    Headings, items and text paragraphs (verbatim paragraphs, =begin/=end
    and =for blocks dropped), formatting codes reduced to text.
  """
  out = []
  in_begin = False
  for block in re.split(r"\n\s*\n", text):
    if not block.strip():
      continue
    if block.startswith("="):
      command, _, rest = block.partition(" ")
      command = command.split("\n", 1)[0]
      if command == "=begin":
        in_begin = True
      elif command == "=end":
        in_begin = False
      elif command in ("=head1", "=head2", "=head3", "=head4", "=item"):
        if not in_begin and rest.strip() not in ("*", ""):
          out.append(" ".join(pod_inline(rest).split()))
      continue
    if in_begin or block[0] in " \t":
      continue
    out.append(" ".join(pod_inline(block).split()))
  return [p for p in out if p]


def document_paragraphs(path: str, text: str) -> List[str]:
  """Paragraphs of one document, by file type (HTML, POD, else reST/text)."""
  lower = path.lower()
  if re.search(r"\.html?(\.[a-z]{2}(-[a-z]{2})?)?$", lower):
    return html_paragraphs(text)
  if lower.endswith(".pod"):
    return pod_paragraphs(text)
  return rst_paragraphs(text)
