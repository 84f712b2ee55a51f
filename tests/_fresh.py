"""Code that makes a fresh Python process behave as if `merits` were not installed.

Prepended to the scripts that check the Hub folders load with remote code only. It hides `merits` from
every import mechanism, including the finder of an editable install (`pip install -e .`), and drops the
repository from `sys.path`.
"""

import textwrap

HIDE_MERITS = textwrap.dedent(
    r"""
    import importlib.abc, os, sys

    class BlockMerits(importlib.abc.MetaPathFinder):
        # Hides `merits` from every import mechanism, including an editable install's finder.
        def find_spec(self, name, path=None, target=None):
            if name == "merits" or name.startswith("merits."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockMerits())
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.getcwd(), "merits", "__init__.py"))]
    try:
        import merits  # noqa: F401
    except ModuleNotFoundError:
        merits_hidden = True
    else:
        merits_hidden = False
    """
)
