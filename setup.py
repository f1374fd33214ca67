"""Packaging glue that pyproject.toml alone cannot say: the top-level folders Mondrian reads at run time
(templates/, advisors/, samples/, launchd/) stay where the checkout keeps them and travel in the wheel as
`daemon/bundled/<name>/`, where daemon/resources.py finds them in an installed package. Everything else about
the package (name, version, dependencies, the `mondrian` command) is in pyproject.toml."""
from setuptools import find_packages, setup

BUNDLED = ("templates", "advisors", "samples", "launchd")

setup(
    packages=find_packages(include=["daemon*", "jobs*", "bench*"]) + [f"daemon.bundled.{n}" for n in BUNDLED],
    package_dir={f"daemon.bundled.{n}": n for n in BUNDLED},
    package_data={"daemon.pipeline": ["*.json"], **{f"daemon.bundled.{n}": ["**/*"] for n in BUNDLED}},
    # In a checkout that is also the Mondrian home, advisors/<id>/references/ holds the user's own photos and
    # their index: never ship those.
    exclude_package_data={"daemon.bundled.advisors": ["*/references/*"], "": ["*.pyc", "*/__pycache__/*"]},
    include_package_data=False,
)
