"""Readability figures of the core files, measured as issue 33 measures the anchors: non-blank lines,
leading spaces counted; the share of lines over 100 characters; the longest functions; import
circles between the repository's own modules.

    python tools/code_stats.py            # the table for the core files
    python tools/code_stats.py FILE...    # the same for other files
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = [
    "model.py",
    "strategies.py",
    "train.py",
    "evaluate.py",
    "flops.py",
    "abstract_java.py",
    "runs.py",
    "serve.py",
    "weights.py",
    "data/*.py",
    "kernels/*.py",
]


def core_files():
    files = []
    for pattern in CORE:
        files.extend(sorted(ROOT.glob(pattern)))
    return files


def function_lengths(tree):
    """(qualified name, lines) of every function, nested ones included."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def local_imports(tree, modules):
    """The repository's own modules that `tree` imports (at any depth)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            for alias in node.names:
                names.add(node.module + "." + alias.name)
    return {name for name in names if name in modules}


def module_name(path):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_cycles(files):
    modules = {module_name(f): f for f in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = local_imports(ast.parse(path.read_text()), modules) - {name}
    cycles = set()
    for a in graph:
        for b in graph[a]:
            if a in graph.get(b, ()):
                cycles.add(tuple(sorted((a, b))))
    return sorted(cycles)


def main():
    files = [Path(f).resolve() for f in sys.argv[1:]] or core_files()
    lines = []
    functions = []
    for path in files:
        text = path.read_text()
        lines += [line for line in text.split("\n") if line.strip()]
        for name, length in function_lengths(ast.parse(text)):
            functions.append((length, f"{path.relative_to(ROOT)}:{name}"))
    long_lines = sum(len(line) > 100 for line in lines)
    mean = sum(len(line) for line in lines) / len(lines)
    print(f"files: {len(files)}, non-blank lines: {len(lines)}")
    print(f"mean characters a line: {mean:.1f}")
    print(f"lines over 100 characters: {long_lines} ({100 * long_lines / len(lines):.1f}%)")
    print("longest functions:")
    for length, name in sorted(functions, reverse=True)[:8]:
        print(f"  {length:4d}  {name}")
    print("import circles:", import_cycles(core_files()) or "none")


if __name__ == "__main__":
    main()
