"""rmsprop_jax: RMSprop and its variants as composable Optax transformations."""

import importlib.metadata

from rmsprop_jax import _presets as presets
from rmsprop_jax._alias import RmspropState as RmspropState, rmsprop as rmsprop
from rmsprop_jax._diagnostics import (
    EffectiveLearningRate as EffectiveLearningRate,
    effective_learning_rate as effective_learning_rate,
)
from rmsprop_jax._sharding import zero1_shardings as zero1_shardings
from rmsprop_jax._transform import ScaleByRmsState as ScaleByRmsState, scale_by_rms as scale_by_rms


try:
    __version__ = importlib.metadata.version("rmsprop_jax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = (
    "EffectiveLearningRate",
    "RmspropState",
    "ScaleByRmsState",
    "effective_learning_rate",
    "presets",
    "rmsprop",
    "scale_by_rms",
    "zero1_shardings",
)

#  ____________________________________________
# / Modules whose names start with an          \
# \ underscore are private: import from here.  /
#  --------------------------------------------
