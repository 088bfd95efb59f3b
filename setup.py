"""Adds the bundled top-level folders (see pyproject.toml) to the discovered packages."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["rlflow", "rlflow.*"])
    + ["rlflow._bundled.recipes", "rlflow._bundled.data_preprocess"],
)
