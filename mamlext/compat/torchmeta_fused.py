"""``import mamlext.compat.torchmeta_fused``: torchmeta 1.8 on current torch, fused.

One line for a torchmeta script: it bridges what ``import mamlext.compat.torchmeta``
bridges, then makes torchmeta's own ``gradient_update_parameters`` mamlext's fused one
under every name it is reachable by (:func:`mamlext.compat.torchmeta.use_fused_update`),
including inside library code that imported it from ``torchmeta.utils``. Import it first.
"""

from mamlext.compat.torchmeta import use_fused_update

use_fused_update()
