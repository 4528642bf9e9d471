"""gptfast.kernels: Triton kernels, one file per op, each with its launch wrapper.

Nothing here knows about models; ``gptfast.functional`` is the only caller. Importing a
kernel module imports triton, so ``gptfast`` imports them lazily.

This folder installs as ``gptfast.kernels``. In a checkout it also sits at the top of the
repository, where ``python -m pytest``, ``python -c`` or a script in the root put it on
``sys.path`` under the bare name ``kernels``, the name of Hugging Face's ``kernels`` package
(which transformers imports). When imported under that bare name, this file hands the import
over to the first other ``kernels`` on ``sys.path``, so the checkout never hides it; with none
installed, the import fails as it would outside the checkout.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _other_kernels_package():
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        others = [entry for entry in sys.path
                  if os.path.abspath(entry or os.curdir) != here]
        return importlib.machinery.PathFinder.find_spec("kernels", others)

    _spec = _other_kernels_package()
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the checkout's kernels/ folder is "
                                  "gptfast.kernels, not a top-level package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    # The import system returns whatever sys.modules holds under the name once this file has run.
    sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
