"""rmsprop_jax: RMSprop and its variants as composable Optax transformations."""

import importlib.metadata

from rmsprop_jax import _presets as presets
from rmsprop_jax._alias import RmspropState as RmspropState, rmsprop as rmsprop
from rmsprop_jax._decode import decode_state as decode_state
from rmsprop_jax._diagnostics import (
    EffectiveLearningRate as EffectiveLearningRate,
    effective_learning_rate as effective_learning_rate,
)
from rmsprop_jax._flat_layout import flatten_params as flatten_params
from rmsprop_jax._flat_mode import FlatState as FlatState, flat_apply as flat_apply, flat_init as flat_init
from rmsprop_jax._param_rounding import ParamRoundingState as ParamRoundingState, param_rounding as param_rounding
from rmsprop_jax._sharding import zero1_shardings as zero1_shardings
from rmsprop_jax._storage import StoredBuffer as StoredBuffer
from rmsprop_jax._transform import ScaleByRmsState as ScaleByRmsState, scale_by_rms as scale_by_rms


try:
    __version__ = importlib.metadata.version("rmsprop_jax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = (
    "EffectiveLearningRate",
    "FlatState",
    "ParamRoundingState",
    "RmspropState",
    "ScaleByRmsState",
    "StoredBuffer",
    "decode_state",
    "effective_learning_rate",
    "flat_apply",
    "flat_init",
    "flatten_params",
    "param_rounding",
    "presets",
    "rmsprop",
    "scale_by_rms",
    "zero1_shardings",
)

#  ____________________________________________
# / Modules whose names start with an          \
# \ underscore are private: import from here.  /
#  --------------------------------------------
