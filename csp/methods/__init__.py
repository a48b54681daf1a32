"""Image-token reduction methods; importing this package registers all of them.

One module per method: ``lvlm_csp`` (csp), ``prumerge`` (prumerge, prumerge_plus), ``visionzip``,
``fastv``, ``simignore``, ``sparsevlm``, ``pyramiddrop``, ``feather``, ``ivc_prune``, ``litelvlm``; ``random_keep`` (a control).
"""

from csp.methods import (  # noqa: F401  (each module registers its methods)
    fastv,
    feather,
    ivc_prune,
    litelvlm,
    lvlm_csp,
    prumerge,
    pyramiddrop,
    random_keep,
    simignore,
    sparsevlm,
    visionzip,
)
from csp.methods.base import (
    METHODS,
    Method,
    ReducedImages,
    VisionFeatures,
    build_method,
    register_method,
)
from csp.methods.lvlm_csp import as_method

__all__ = ["METHODS", "as_method", "Method", "ReducedImages", "VisionFeatures", "build_method", "register_method"]
