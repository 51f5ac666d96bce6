"""PEP 517 build backend: setuptools', asking for the torch the package will run against.

firp_engine._C is compiled against torch's C++ library and loads only into that same torch.
With build isolation (a plain `pip install .`), pip builds in a fresh environment filled with
the build requirements; asked for just "torch", it picks the newest torch on the index, which
need not be the one already installed (and whose CUDA flavour may differ too). So the build
asks for exactly the torch version of the environment being installed into, when it has one.
setup.py then pins the package's own torch requirement to the torch it was built against.
"""

from __future__ import annotations

import importlib.metadata
import site

# The hooks this module leaves as they are (pip looks them up here by name).
from setuptools.build_meta import (  # noqa: F401
    build_editable,
    build_sdist,
    build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)


def installed_torch() -> str | None:
    """The torch version of the environment being installed into, or None.

    pip runs these hooks with that environment's interpreter but hides its site-packages from
    sys.path; `site` still names them. (A build that runs in a separate venv, as with pip's
    `--use-feature venv-isolation`, sees no torch here and takes the index's.)
    """
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    dist = next(iter(importlib.metadata.distributions(name="torch", path=paths)), None)
    return dist.version if dist else None


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    # setuptools' own version of this hook runs setup.py, which needs torch to be there already.
    version = installed_torch()
    return [f"torch=={version}" if version else "torch"]


get_requires_for_build_editable = get_requires_for_build_wheel
get_requires_for_build_sdist = get_requires_for_build_wheel
