"""The package list, which pyproject.toml cannot say alone: every ddsm_search* package as found, plus the
top-level search_spaces/ folder mapped to ddsm_search.search_spaces, so that the wheel carries the
experiment configs inside the package while the checkout keeps them where its layout puts them."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ddsm_search*"]), "ddsm_search.search_spaces"],
      package_dir={"ddsm_search.search_spaces": "search_spaces"})
