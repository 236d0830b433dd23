"""src2abs in pure Python: the abstraction behind the paper's "abstracted match" metric (§3.3),
plus the Java lexer and identifier extractor used for BLEU-4 and the coding-style metric (§3.3,
Figure 3b).

Implements docs/src2abs.md (section and quirk ids Q1-Q13 are cited inline). Pipeline per input:
preprocess (comment and annotation removal, §3) -> a parser pass that only yields the TYPES and
METHODS string sets (§5, tree-sitter standing in for JavaParser 3.5.6) -> a Java 7 lexer with ANTLR
4.5.3 semantics (§4) -> identifier chains, the six classification rules, seven counters (§6-8).
compat=True reproduces every quirk of the original tool; compat=False (the metric default, §11)
fixes only Q1 (literal-blind comment regex) and Q2 (`@.+` annotation regex) and keeps everything
else.

    # writes OUT and OUT.map (JSON)
    python abstract_java.py single IN OUT [--idioms FILE] [--compat]
    python abstract_java.py pair INA INB OUTA OUTB [--idioms FILE] [--compat]
"""

import argparse
import json
import os
import re
import sys
import unicodedata
from pathlib import Path
import tree_sitter_java
from tree_sitter import Language, Parser, Query, QueryCursor

# ----------------------------------------------------------------------------------------------
# lexer (§4)
# 50 keywords + 3 literals, all printed verbatim
KEYWORDS = frozenset(
    """abstract assert boolean break byte case catch char class const continue default do double
else enum extends final finally float for if goto implements import instanceof int interface long
native new package private protected public return short static strictfp super switch synchronized
this throw throws
transient try void volatile while true false null""".split()
)
_D = r"[0-9](?:[0-9_]*[0-9])?"  # Digits: underscores only between digits
_H = r"[0-9a-fA-F](?:[0-9a-fA-F_]*[0-9a-fA-F])?"  # HexDigits
_EXP = rf"[eE][+-]?{_D}"
# One alternation tried in this order at each position. FLOAT sits before INT because whenever a
# float matches it is strictly longer than the integer prefix (`09.5`, `1e5`, `0x1p3`), which is
# ANTLR's longest match. Optional parts are greedy and nothing mandatory follows them, so each
# alternative yields its longest prefix: a failed longer attempt falls back to the longest accepted
# token (`0x` -> `0` `x`, `1e+` -> `1` `e` `+`).
_TOKEN = re.compile(
    # skipped; unterminated /* falls through to `/` `*`
    r"(?P<WS>[ \t\r\n\f]+|/\*[\s\S]*?\*/|//[^\r\n]*)"
    rf"|(?P<FLOAT>{_D}\.(?:{_D})?(?:{_EXP})?[fFdD]?|\.{_D}(?:{_EXP})?[fFdD]?"
    rf"|{_D}{_EXP}[fFdD]?|{_D}[fFdD]"
    rf"|0[xX](?:{_H}\.?|(?:{_H})?\.{_H})[pP][+-]?{_D}[fFdD]?)"
    rf"|(?P<INT>(?:0[xX]{_H}|0[bB][01](?:[01_]*[01])?|0_*[0-7](?:[0-7_]*[0-7])?"
    rf"|[1-9](?:_*{_D})?|0)[lL]?)"
    r"|(?P<ID>[A-Za-z$_][A-Za-z0-9$_]*)"
    # Q4: both literals accept raw newlines; a char is one UTF-16 unit (no non-BMP char). `*+`:
    # Python >= 3.11
    r"""|(?P<STRING>"(?:[^"\\]|\\(?:[btnfr"'\\0-7]|u[0-9a-fA-F]{4}))*+")"""
    r"""|(?P<CHAR>'(?:[^'\\\U00010000-\U0010FFFF]"""
    r"""|\\(?:[btnfr"'\\]|[0-3][0-7]{2}|[0-7]{1,2}|u[0-9a-fA-F]{4}))')"""
    # Q5: no `->` `::` `>>` `>>>` `<<` tokens (lambdas print `- >`, generics need split `>`).
    r"|(?P<KW>>>>=|>>=|<<=|\.\.\.|==|<=|>=|!=|&&|\|\||\+\+|--|[-+*/&|^%]="
    r"|[-(){}\[\];,.=><!~?:+*/&|^%@])"
)
_STRING_PREFIX = re.compile(r""""(?:[^"\\]|\\(?:[btnfr"'\\0-7]|u[0-9a-fA-F]{4}))*+""")
_ASCII_PART = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789$_")
_HEX, _OCT = frozenset("0123456789abcdefABCDEF"), frozenset("01234567")


# Character.isJavaIdentifierStart for non-ASCII (the grammar's predicate); Unicode tables
def _java_start(ch):
    # may differ slightly
    return unicodedata.category(ch) in ("Lu", "Ll", "Lt", "Lm", "Lo", "Nl", "Sc", "Pc")


# Character.isJavaIdentifierPart (non-ASCII): adds digits, marks, "ignorable" controls
def _java_part(ch):
    return _java_start(ch) or ch <= "\x9f" or unicodedata.category(ch) in ("Nd", "Mn", "Mc", "Cf")


def _death(s, p):
    """Index of the character at which a literal opened at p can no longer continue (len(s) at EOF).
    ANTLR drops s[p : death + 1] and resumes after it (§4 error recovery)."""
    n = len(s)
    # a valid string would have matched: we stopped at EOF or at a backslash with a bad escape
    if s[p] == '"':
        e = _STRING_PREFIX.match(s, p).end()
        if e >= n - 1 or s[e + 1] != "u":
            return e + 1
        k = e + 2
        while k < min(e + 6, n) and s[k] in _HEX:
            k += 1
        return k
    c = p + 1  # character literal
    if c >= n or s[c] == "'":
        return c
    if s[c] != "\\":
        return c if ord(s[c]) > 0xFFFF else c + 1  # non-BMP: dies on its low surrogate
    e = c + 1
    if e >= n or s[e] in "btnfr\"'\\":
        return e + 1
    if s[e] in _OCT or s[e] == "u":
        k, stop, ok = (
            e + 1,
            min(e + (5 if s[e] == "u" else 3 if s[e] <= "3" else 2), n),
            _HEX if s[e] == "u" else _OCT,
        )
        while k < stop and s[k] in ok:
            k += 1
        return k
    return e


def lex(code):
    """The Java 7 lexer of src2abs (ANTLR grammars-v4 Java.g4, §4) -> list of (kind, text). kind:
    'ID' (Identifier), 'KW' (keyword, true/false/null, separator or operator: printed verbatim),
    'INT', 'FLOAT', 'CHAR', 'STRING'. Whitespace and comments are skipped; text no rule accepts
    is dropped by ANTLR's rule (an unterminated string swallows up to the next `"` or is dropped
    to EOF)."""
    toks, pos, n, match = [], 0, len(code), _TOKEN.match
    while pos < n:
        m = match(code, pos)
        kind, end = (m.lastgroup, m.end()) if m else (None, pos + 1)
        if kind is None and code[pos] in "\"'":
            pos = _death(code, pos) + 1
            continue
        if kind == "ID" or kind is None and code[pos] >= "\x80" and _java_start(code[pos]):
            kind = "ID"
            while end < n and (
                code[end] in _ASCII_PART or code[end] >= "\x80" and _java_part(code[end])
            ):
                end += 1
            if code[pos:end] in KEYWORDS:
                kind = "KW"
        if kind is not None and kind != "WS":
            toks.append((kind, code[pos:end]))
        pos = end  # kind None: a character that starts no rule (`#`, `\`, NBSP) is dropped alone
    return toks


def java_tokens(code):
    """Token texts of `lex(code)` on the raw code, for BLEU-4: space-join them. Comments are
    skipped, literals kept whole; Q5 holds here too (`->` gives `-` `>`), so prediction and
    reference split the same way."""
    return [text for _, text in lex(code)]


# -------------------------------------------------------------------------------------
# preprocessing (§3)
_NOT_NL = r"[^\n\r\u0085\u2028\u2029]"  # Java regex `.`
_COMMENT = re.compile(rf"(?:/\*(?:[^*]|(?:\*+[^*/]))*\*+/)|(?://{_NOT_NL}*)")
_ANNOTATION = re.compile(rf"@{_NOT_NL}+")
# literals, multi-line as the lexer (Q4)
_LIT = r""""(?:[^"\\]|\\[\s\S])*+"|'(?:\\[\s\S][^'\\\n]*|[^'\\])\'"""
_CLEAN_COMMENT = re.compile(rf"({_LIT})|/\*[\s\S]*?\*/|//{_NOT_NL}*")
_CLEAN_ANNOTATION = re.compile(rf"({_LIT})|@(?!\s*interface\b)\s*[\w$]+(?:\s*\.\s*[\w$]+)*")
_OPEN_PAREN, _PARENS = re.compile(r"\s*\("), re.compile(rf"{_LIT}|[()]")
# Q3: Java's regex overflows its stack on block comments of about 1,630+ chars (grey zone)
Q3_LIMIT = 1640


def _drop_annotations(s):
    """Q2 fixed: drop only `@Name` / `@a.b.Name` plus a balanced `( ... )` (literal-aware), keep
    `@interface`."""
    out, pos = [], 0
    while m := _CLEAN_ANNOTATION.search(s, pos):
        out.append(s[pos : m.end()] if m[1] else s[pos : m.start()] + " ")
        pos = m.end()
        if m[1] is None and (paren := _OPEN_PAREN.match(s, pos)):
            depth = 0
            for t in _PARENS.finditer(s, paren.end() - 1):  # unbalanced: only the name is dropped
                depth += (t[0] == "(") - (t[0] == ")")
                if depth == 0:
                    pos = t.end()
                    break
    return "".join(out) + s[pos:]


def preprocess(text, compat=False):
    """-> (stripped text, q3_overflow). compat: the two regexes of the original, literally (Q1,
    Q2)."""
    if compat:
        big = []
        s = _COMMENT.sub(lambda m: big.append(m[0][1] == "*" and len(m[0]) >= Q3_LIMIT) or "", text)
        return _ANNOTATION.sub("", s), any(big)
    return _drop_annotations(_CLEAN_COMMENT.sub(lambda m: m.group(1) or "", text)), False


def identifiers(code):
    """Identifier tokens of `lex` after clean comment and annotation removal, in order, repeats
    kept: the names of variables, fields, methods, types, labels and package segments (a dotted
    name gives one per segment). Keywords, literals and annotation names are not included. Used
    as the coding-style tf-idf document."""
    return [text for kind, text in lex(preprocess(code)[0]) if kind == "ID"]


# ------------------------------------------------------------------------ parser pass: TYPES,
# METHODS (§5)
_LANG = Language(tree_sitter_java.language())
_PARSER = Parser(_LANG)
_QUERY = Query(
    _LANG,
    """
(type_identifier) @type (scoped_type_identifier) @type
(method_declaration name: (identifier) @method) (method_invocation name: (identifier) @method)
(method_invocation object: [(identifier) (field_access)] @scope)
(method_reference) @ref
(switch_expression) @switch
[(switch_rule) (yield_statement) (record_declaration) (multiline_string_fragment) (permits)
 (instanceof_expression name: (_)) (resource !type) \
(modifiers "sealed") (modifiers "non-sealed")] @bad
((identifier) @bad (#eq? @bad "_"))
(class_body (method_declaration (modifiers "default")) @bad)
""",
)
# Statement positions of a switch; anywhere else it is a Java 14 switch expression (Q10).
_STMT_PARENTS = frozenset(
    (
        "block",
        "switch_block_statement_group",
        "labeled_statement",
        "if_statement",
        "do_statement",
        "while_statement",
        "for_statement",
        "enhanced_for_statement",
        "constructor_body",
    )
)
_FILTER = re.compile(r"[\[\]()><{},?]|extends|implements")


def _filter_string(s):  # src2abs filterString: Q9, `FooextendsBar` gives `Foo` and `Bar`
    return [p for p in _FILTER.sub(" ", "".join(s.split())).split(" ") if p]


def _text(node):
    return node.text.decode("utf-8", "replace")


def _collect(stripped, types, methods):
    """JavaParser pass on the DummyClass wrapper; fills the sets and returns True, or False on
    parse failure. tree-sitter is error-tolerant and knows modern Java, so ERROR/MISSING nodes,
    post-Java-8 constructs and a `default` method in the class wrapper count as failure (Q10)."""
    tree = _PARSER.parse(
        ("public class DummyClass {" + stripped + "}").encode("utf-8", "surrogatepass")
    )
    if tree.root_node.has_error:
        return False
    caps = QueryCursor(_QUERY).captures(tree.root_node)
    if caps.get("bad") or any(n.parent.type not in _STMT_PARENTS for n in caps.get("switch", ())):
        return False
    new_types, new_methods = set(), {_text(n) for n in caps.get("method", ())}
    # every Type node: asString -> filterString; a type_identifier that names
    for n in caps.get("type", ()):
        # the last segment of a scoped type is not a Type node of its own
        p = n.parent
        if (
            n.type == "scoped_type_identifier"
            or p.type != "scoped_type_identifier"
            or p.named_children[0] == n
        ):
            new_types.update(_filter_string(_text(n)))
    # way 2: call scope whose last segment starts upper-case (`LOG`, `Foo.BAR`)
    for n in caps.get("scope", ()):
        last = n.child_by_field_name("field") if n.type == "field_access" else n
        if (
            last is not None
            and last.type == "identifier"
            and n.next_named_sibling.type != "super"
            and _text(last)[0] != _text(last)[0].lower()
        ):
            new_types.update(_filter_string(_text(n)))
    # JavaParser parses `Name::` as a TypeExpr, whatever the name (`foo::bar`)
    for n in caps.get("ref", ()):
        scope, name = n.named_children[0], _text(n.children[-1])
        new_methods.add(name)
        if scope.type in ("identifier", "field_access") and re.fullmatch(
            r"[\w$.\s]+", _text(scope)
        ):
            parts = "".join(_text(scope).split()).split(".")
            new_types.update(
                p for k in range(len(parts)) for p in _filter_string(".".join(parts[: k + 1]))
            )
    types.update(new_types)
    methods.update(new_methods)
    return True


# -------------------------------------------------------------------------------- abstraction
# (§6-8) mapping order: category, then number
_ORDER = ("CHAR", "FLOAT", "INT", "METHOD", "STRING", "TYPE", "VAR")


def _placeholder(ids, cat, key):  # ids assigned at first emission, one counter per category (§8)
    d = ids.setdefault(cat, {})
    return f"{cat}_{d.setdefault(key, len(d) + 1)}"


def _classify(tok, could_call, types, methods, idioms, ids):
    """§7, rules in their exact order. `first` is sliced as in the original (Q7)."""
    if tok in idioms:
        return tok  # 1
    parts = tok.split(".")
    while parts[-1] == "":
        parts.pop()  # Java split
    last, multi = parts[-1], len(parts) > 1
    first = tok[: len(tok) - len(last) - 1]

    def prefix():
        return (
            first
            if first in idioms
            else _placeholder(ids, "TYPE" if first in types else "VAR", first)
        )

    if multi and last in idioms:
        return prefix() + " . " + last  # 2
    if tok in types:
        return _placeholder(ids, "TYPE", tok)  # 3
    if could_call and tok in methods:
        return _placeholder(ids, "METHOD", tok)  # 4
    if could_call and multi and last in methods:  # 5
        return prefix() + " . " + _placeholder(ids, "METHOD", last)
    return _placeholder(ids, "VAR", tok)  # 6


def _abstract_tokens(toks, types, methods, idioms, ids):
    out, n, i = [], len(toks), 0
    while i < n:
        kind, text = toks[i]
        if kind == "ID":  # the chain Identifier (. Identifier)*, absorbing a trailing dot (Q6)
            j = i
            while j + 1 < n and toks[j + 1] == ("KW", "."):
                if j + 2 < n and toks[j + 2][0] == "ID":
                    j += 2
                else:
                    j += 1
                    break
            could_call = (j + 1 < n and toks[j + 1][1] == "(") or (
                j > 2 and toks[j - 1][1] == toks[j - 2][1] == ":"
            )
            out.append(
                _classify(
                    "".join(t for _, t in toks[i : j + 1]), could_call, types, methods, idioms, ids
                )
            )
            # Q8: a chain ending at the last token is not skipped; its tail is redone
            if j != n - 1:
                i = j
        elif kind == "KW" or text in idioms:
            out.append(text)
        else:
            out.append(_placeholder(ids, kind, text))  # literals keyed by exact text
        i += 1
    return " ".join(out).strip()


def abstract_pair(a, b, idioms=None, compat=False):
    """Pair mode (§9): TYPES/METHODS accumulated from A then B, one tokenizer, so ids are shared
    and B continues A's counters. Both parses sit in one `try` in the original: if A fails B is
    never parsed (Q11). -> (abstracted A, abstracted B, {placeholder: original text})."""
    idioms = frozenset(idioms or ())
    types, methods, ids, pre = set(), set(), {}, [preprocess(x, compat) for x in (a, b)]
    for stripped, overflow in pre:
        # Q3: the parser pass overflows too
        if overflow or not _collect(stripped, types, methods):
            break
    out = [
        ("<ERROR>" if overflow else _abstract_tokens(lex(stripped), types, methods, idioms, ids))
        for stripped, overflow in pre
    ]
    return out[0], out[1], {f"{c}_{n}": key for c in _ORDER for key, n in ids.get(c, {}).items()}


def abstract(code, idioms=None, compat=False):
    """Single mode, method granularity -> (abstracted text, {placeholder: original text}). Same
    as a pair with an empty B, which parses as an empty class and has no tokens."""
    return abstract_pair(code, "", idioms, compat)[::2]


# --------------------------------------------------------------------------------------------------
# CLI
def _read(path):
    try:
        return Path(path).read_bytes().decode("utf-8")
    # Q13 fixed for our CLI: a message naming the file, exit code 1
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"abstract_java: cannot read {path} as UTF-8 text: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="src2abs abstraction of Java code (see the module docstring)"
    )
    ap.add_argument("mode", choices=("single", "pair"))
    ap.add_argument("paths", nargs="+", help="single: IN OUT; pair: INA INB OUTA OUTB")
    ap.add_argument("--idioms", help="one idiom per line, exact text, UTF-8")
    ap.add_argument(
        "--compat", action="store_true", help="reproduce every quirk, Q1 and Q2 included"
    )
    args = ap.parse_args(argv)
    k = 1 if args.mode == "single" else 2
    if len(args.paths) != 2 * k:
        ap.error(f"{args.mode} takes {2 * k} paths")
    idioms = re.split(r"\r\n|\r|\n", _read(args.idioms)) if args.idioms else []  # no trimming (§1)
    if idioms and idioms[-1] == "":
        idioms.pop()  # a final line break ends the last line
    ins = [_read(p) for p in args.paths[:k]] + [""]  # single = pair with an empty B
    *texts, mapping = abstract_pair(ins[0], ins[1], idioms, args.compat)
    # Q12 fixed: JSON, named after OUT (A)
    mapping = json.dumps(mapping, ensure_ascii=False, indent=1)
    for path, text in [*zip(args.paths[k:], texts), (args.paths[k] + ".map", mapping)]:
        Path(path + ".tmp").write_text(text, encoding="utf-8")
        os.replace(path + ".tmp", path)  # temp file + rename: a reader never sees half a file


if __name__ == "__main__":
    sys.exit(main())
