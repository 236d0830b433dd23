"""Parse one Java file into methods2test's Class / Method / field dicts (§3.1 Dataset;
../docs/methods2test.md §4).

This is our rewrite of methods2test's `scripts/TestParser.py` on the modern tree-sitter API:
`Parser(Language(tree_sitter_java.language()))`. Used by data/mine.py; try it on one file with

python -m data.java path/to/Foo.java

What is parsed (as methods2test does): only TOP-LEVEL `class_declaration`s (interfaces, enums,
records and nested classes such as JUnit 5 `@Nested` are ignored), and only the methods and
constructors that are direct children of such a class body. A test case is a method whose modifiers
contain the substring `@Test` (so `@TestFactory` counts and `@ParameterizedTest` does not).

Deliberate deviation (../docs/methods2test.md §9.3): spans are cut from the file's BYTES with
tree-sitter's byte offsets and then decoded (UTF-8, else Latin-1), so a non-ASCII character
earlier in the file never shifts a span, and no file is skipped for its encoding. The released
script sliced a Python str with byte columns."""

import re
import sys

import tree_sitter_java
from tree_sitter import Language, Parser

PARSER = Parser(Language(tree_sitter_java.language()))


# a literal (kept as it is), a block comment (kept), or a line comment (group 1: its text)
_LITERAL_OR_COMMENT = re.compile(
    r'''"""[\s\S]*?"""|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|/\*[\s\S]*?\*/|//([^\n\r]*)'''
)


def collapse(text):
    """The one-line form of the corpus strings: all whitespace runs (newlines included) to one
    space, after every `// comment` became `/* comment */`. Without that, once the newline is
    gone a line comment would swallow the code after it (30% of commons-io's tests hold one;
    BLEU, matching and parsing would see half a test). On a string that is one line already
    (methods2test's released corpus) the text after `//` was a comment and stays one, so the
    meaning never changes."""

    def line(m):
        return m[0] if m[1] is None else "/*" + m[1].replace("*/", "* /") + " */"

    return " ".join(_LITERAL_OR_COMMENT.sub(line, text).split())


def decode(data):
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"  # never fails: every byte is a character


def parse_java(data):
    """Bytes of a .java file -> (list of top-level Class dicts, whether the tree has syntax errors).

    A Class dict has identifier, superclass, interfaces, fields and methods; each method dict
    also carries `_node` (its tree-sitter node) and `_text` (the slicer) so invocations can be
    collected later, only for the methods that end up in a record. mine.py strips the private
    keys before export."""
    enc = decode(data)

    def text(n):
        return data[n.start_byte : n.end_byte].decode(enc) if n is not None else ""

    tree = PARSER.parse(data)
    classes = [
        class_dict(n, text) for n in tree.root_node.children if n.type == "class_declaration"
    ]
    return classes, tree.root_node.has_error


def class_dict(node, text):
    name = text(node.child_by_field_name("name"))
    body = node.child_by_field_name("body")
    members = body.children if body is not None else []
    return {
        "identifier": name,
        # includes the keyword: "extends X"
        "superclass": text(node.child_by_field_name("superclass")),
        "interfaces": text(node.child_by_field_name("interfaces")),  # "implements A, B"
        "fields": [field_dict(n, text) for n in members if n.type == "field_declaration"],
        "methods": [
            method_dict(n, name, text)
            for n in members
            if n.type in ("method_declaration", "constructor_declaration")
        ],
    }


def _modifiers(node):
    # `modifiers` is a child, not a field, and holds the annotations too
    return next((c for c in node.children if c.type == "modifiers"), None)


def field_dict(node, text):
    decl = node.child_by_field_name("declarator")  # the FIRST declarator only, as methods2test
    return {
        "original_string": text(node),
        "modifier": text(_modifiers(node)),  # raw: whitespace not normalised
        "type": text(node.child_by_field_name("type")),
        "declarator": text(decl),
        "var_name": text(decl.child_by_field_name("name")) if decl is not None else "",
    }


def method_dict(node, class_name, text):
    ident = text(node.child_by_field_name("name"))
    params = text(node.child_by_field_name("parameters"))
    modifiers = collapse(text(_modifiers(node)))
    # methods2test: the LAST child whose node type contains "type" -- the return type of a method,
    # "" for a constructor (or its "<T>" type_parameters, a quirk we keep)
    ret = text(next((c for c in reversed(node.children) if "type" in c.type), None))
    return {
        "identifier": ident,
        "parameters": params,
        "modifiers": modifiers,
        "return": ret,
        # the whole declaration, first annotation to closing brace; Javadoc excluded
        "body": text(node),
        "signature": f"{ret} {ident}{params}",
        "full_signature": f"{modifiers} {ret} {ident}{params}",
        "class_method_signature": f"{class_name}.{ident}{params}",
        "testcase": "@Test" in modifiers,
        "constructor": node.type == "constructor_declaration",
        "_node": node,
        "_text": text,
    }


def invocations(method):
    """Names of every method_invocation inside the declaration: pre-order, duplicates kept, receiver
    dropped.

    For constructors methods2test searched a node type the grammar never produces, so their list
    is always empty; we keep that, so that our records match the published ones."""
    if method["constructor"]:
        return []
    names, stack = [], [method["_node"]]
    while stack:
        n = stack.pop()
        if n.type == "method_invocation":
            names.append(method["_text"](n.child_by_field_name("name")))
        stack.extend(reversed(n.children))  # reversed so the pop order is pre-order
    return names


if __name__ == "__main__":
    import json

    classes, err = parse_java(open(sys.argv[1], "rb").read())
    for c in classes:
        for m in c["methods"]:
            m["invocations"] = invocations(m)
            del m["_node"], m["_text"]
    print(json.dumps({"classes": classes, "has_error": err}, indent=1, ensure_ascii=False))
