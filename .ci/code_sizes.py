"""Module and function sizes of a source tree (python .ci/code_sizes.py src/alexnet).

The layout's limits: modules of about 400 lines at most, functions of about 80.
"""

import ast
import collections
import sys
from pathlib import Path

root = Path(sys.argv[1])
mods = sorted(root.rglob("*.py"))
per_folder = collections.Counter(str(p.parent.relative_to(root.parent)) for p in mods)
print("modules per folder:", dict(per_folder))
sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root.parent))) for p in mods), reverse=True)
print("largest modules:", sizes[:8])
print("modules over 400 lines:", [s for s in sizes if s[0] > 400])
funcs = []
for p in mods:
    tree = ast.parse(p.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root.parent)}:{node.lineno} {node.name}"))
funcs.sort(reverse=True)
print("largest functions:", funcs[:6])
print("functions over 80 lines:", [f for f in funcs if f[0] > 80])
