"""``tools/code_lines.py``, which gives the update path's size before and after a refactor."""

import importlib.util
import pathlib
import textwrap


ROOT = pathlib.Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("code_lines", ROOT / "tools" / "code_lines.py")
assert _SPEC is not None and _SPEC.loader is not None
code_lines = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(code_lines)


def test_counts_code_only():
    source = textwrap.dedent(
        '''
        """Module docstring,
        two lines."""

        import math  # a comment


        def f(x):
            """Docstring."""
            # a comment line
            return math.sqrt(
                x
            )


        class C:
            """Class docstring."""

            y = "a string that is not a docstring"
        '''
    )
    # import, def, return (3 physical lines), class, y =
    assert code_lines.code_lines(source) == 7


def test_a_first_string_statement_in_code_is_not_counted_twice():
    assert code_lines.code_lines("x = 1\ny = '''a\nb'''\n") == 3
