"""The lazy top-level API: every public name resolves to the same object however often and in whatever
order it is used, whichever submodules were imported before."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ddsm_search


def test_no_submodule_shares_a_name_with_a_public_function():
    # only the package's own modules bind package attributes when imported (ddsm_search.space.steps binds
    # ddsm_search.space.steps, not ddsm_search.steps): the next test imports every module to be sure
    submodules = {m.name for m in pkgutil.iter_modules(ddsm_search.__path__)}
    assert not submodules & set(ddsm_search._API), "a module of that name would replace the function"


def test_public_names_stay_what_they_are_after_every_module_is_imported():
    code = (
        "import importlib, pkgutil, ddsm_search as ds\n"
        "first = {n: getattr(ds, n) for n in ds.__all__}\n"
        "for m in pkgutil.walk_packages(ds.__path__, 'ddsm_search.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "again = {n: getattr(ds, n) for n in ds.__all__}\n"
        "assert all(first[n] is again[n] for n in first), [n for n in first if first[n] is not again[n]]\n"
        "assert callable(ds.train) and callable(ds.evaluate) and callable(ds.quickstart)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
