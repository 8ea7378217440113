"""Code lines of Python modules: lines holding code, not docstrings, comments or blank lines.

Used to give the size of the update path before and after a refactor::

    python tools/code_lines.py rmsprop_jax/{_alias,_transform,_config,_codecs,_step,_storage,_kernel}.py
"""

import ast
import io
import pathlib
import sys
import tokenize


_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def code_lines(source: str) -> int:
    """The number of physical lines holding a token other than a docstring, comment or line break."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


if __name__ == "__main__":
    total = 0
    for path in sys.argv[1:]:
        n = code_lines(pathlib.Path(path).read_text())
        total += n
        print(f"{n:6d}  {path}")
    print(f"{total:6d}  total")
