"""Bad input gets an error naming the argument, its value and what is allowed."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": float("nan")}, "learning_rate=nan is not allowed; it must be a finite real number"),
        ({"learning_rate": float("inf")}, "learning_rate=inf is not allowed"),
        ({"learning_rate": jnp.ones(3)}, "learning_rate must be a scalar or a schedule; got a value of shape (3,)"),
        ({"decay": -0.1}, "decay=-0.1 is outside the allowed range [0.0, 1.0]"),
        ({"decay": 1.5}, "decay=1.5 is outside the allowed range [0.0, 1.0]"),
        ({"decay": float("nan")}, "decay=nan is outside the allowed range [0.0, 1.0]"),
        ({"eps": -1e-8}, "eps=-1e-08 is outside the allowed range [0.0, inf)"),
        ({"initial_scale": -1.0}, "initial_scale=-1.0 is outside the allowed range [0.0, inf)"),
        ({"momentum": 1.0}, "momentum=1.0 is outside the allowed range [0.0, 1.0)"),
        ({"momentum": -0.5}, "momentum=-0.5 is outside the allowed range [0.0, 1.0)"),
        ({"nesterov": True}, "nesterov=True needs momentum; got momentum=None"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 is outside the allowed range [0.0, inf)"),
        ({"state_dtype": "int32"}, "state_dtype='int32' is not supported; allowed: None"),
        ({"state_dtype": "complex64"}, "state_dtype='complex64' is not supported"),
        ({"state_dtype": jnp.float16}, "eps=1e-08 rounds to 0 in the state dtype float16"),
        ({"state_dtype": jnp.bfloat16, "decay": 0.999}, "decay=0.999 rounds to 1.0 in the state dtype bfloat16"),
        ({"bias_correction": True, "initial_scale": 1.0}, "bias_correction=True with initial_scale=1.0"),
        ({"bias_correction": True, "decay": 1.0}, "bias_correction=True with decay=1.0 divides by 1 - 1**t = 0"),
        ({"bias_correction": True, "decay": lambda t: 0.9}, "bias_correction=True needs a constant decay"),
    ],
)
def test_construction_errors(kwargs, message):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        rmsprop_jax.rmsprop(**kwargs)


@pytest.mark.parametrize("flag", ["eps_in_sqrt", "centered", "bias_correction", "nesterov", "maximize"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=re.escape(f"{flag} must be a bool; got 1")):
        rmsprop_jax.rmsprop(1e-3, momentum=0.9, **{flag: 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 2.0}, "decay=2.0 is outside the allowed range"),
        ({"eps": -1.0}, "eps=-1.0 is outside the allowed range"),
        ({"state_dtype": "int2"}, "state_dtype='int2' is not supported"),
    ],
)
def test_scale_by_rms_construction_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rmsprop_jax.scale_by_rms(**kwargs)


def test_integer_and_boolean_params_are_kept_like_optax_keeps_them():
    # eqx.filter(model, eqx.is_array) keeps integer arrays; their gradients come back None.
    params = {"layer": {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32), "mask": jnp.ones(2, bool)}}
    grads = {"layer": {"w": jnp.full(3, 2.0), "step": None, "mask": None}}
    for opt, reference in (
        (rmsprop_jax.presets.optax(1e-3, momentum=0.9), optax.rmsprop(1e-3, momentum=0.9)),
        (rmsprop_jax.rmsprop(1e-3, weight_decay=0.1), None),
    ):
        updates, _ = opt.update(grads, opt.init(params), params)
        assert updates["layer"]["step"] is None and updates["layer"]["mask"] is None
        if reference is not None:
            want, _ = reference.update(grads, reference.init(params), params)
            chex.assert_trees_all_close(updates, want, rtol=1e-6)


def test_complex_params_with_16bit_state_are_rejected():
    opt = rmsprop_jax.rmsprop(1e-3, momentum=0.9, state_dtype="bfloat16")
    with pytest.raises(TypeError, match="state_dtype='bfloat16' cannot hold the momentum or centered buffers"):
        opt.init(jnp.ones(2, jnp.complex64))


def test_eps_that_underflows_in_parameter_precision_is_rejected_at_init():
    opt = rmsprop_jax.rmsprop(1e-3, eps=1e-50)
    with pytest.raises(ValueError, match=re.escape("eps=1e-50 rounds to 0 in the state dtype float32")):
        opt.init(jnp.ones(2))


@pytest.mark.parametrize("transform", [rmsprop_jax.rmsprop(1e-3), rmsprop_jax.scale_by_rms()])
def test_tree_structure_mismatch_names_missing_and_extra_paths(transform):
    state = transform.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"missing from updates: \['b'\]; extra in updates: \['a'\]\.") as info:
        transform.update({"a": jnp.ones(2), "w": jnp.ones(3)}, state)
    assert "PyTreeDef({'a': *, 'w': *})" in str(info.value)
    assert "PyTreeDef({'b': *, 'w': *})" in str(info.value)


def test_tree_mismatch_lists_every_missing_and_extra_path_in_a_nested_tree():
    opt = rmsprop_jax.rmsprop(1e-3)
    state = opt.init({"enc": {"w": jnp.ones(2), "b": jnp.ones(2)}, "dec": [jnp.ones(2), jnp.ones(2)]})
    grads = {"enc": {"w": jnp.ones(2)}, "dec": [jnp.ones(2), jnp.ones(2), jnp.ones(2)], "head": jnp.ones(2)}
    with pytest.raises(ValueError) as info:
        opt.update(grads, state)
    assert "updates has 5 leaves, the optimizer state (built from params) has 4" in str(info.value)
    assert "missing from updates: ['enc']['b']; extra in updates: ['dec'][2], ['head']." in str(info.value)


def test_tree_mismatch_with_the_same_paths_names_the_node_types():
    opt = rmsprop_jax.rmsprop(1e-3)
    state = opt.init([jnp.ones(2), jnp.ones(2)])
    with pytest.raises(ValueError, match="the leaf paths agree but the node types differ") as info:
        opt.update((jnp.ones(2), jnp.ones(2)), state)
    assert "PyTreeDef((*, *))" in str(info.value) and "PyTreeDef([*, *])" in str(info.value)


def test_tree_mismatch_lists_at_most_ten_paths():
    opt = rmsprop_jax.rmsprop(1e-3)
    state = opt.init({f"p{i:02d}": jnp.ones(1) for i in range(12)})
    with pytest.raises(ValueError, match=re.escape("['p09'] and 2 more; extra in updates: ['q']")):
        opt.update({"q": jnp.ones(1)}, state)


def test_leaf_count_mismatch():
    opt = rmsprop_jax.rmsprop(1e-3)
    state = opt.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="updates has 1 leaves, the optimizer state"):
        opt.update({"b": jnp.ones(2)}, state)


@pytest.mark.parametrize("transform", [rmsprop_jax.rmsprop(1e-3), rmsprop_jax.scale_by_rms()])
def test_shape_mismatch_names_the_path(transform):
    state = transform.init({"layer": [jnp.ones((2, 3))]})
    with pytest.raises(ValueError, match=re.escape("updates['layer'][0] has shape (3, 2) but the optimizer state")):
        transform.update({"layer": [jnp.ones((3, 2))]}, state)


def test_integer_gradient_names_the_path():
    opt = rmsprop_jax.rmsprop(1e-3)
    state = opt.init({"w": jnp.ones(3)})
    with pytest.raises(TypeError, match=re.escape("updates['w'] has dtype int32")):
        opt.update({"w": jnp.ones(3, jnp.int32)}, state)


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_without_params(decoupled):
    opt = rmsprop_jax.rmsprop(1e-3, weight_decay=0.1, decoupled_weight_decay=decoupled)
    state = opt.init(jnp.ones(3))
    with pytest.raises(ValueError, match=re.escape("rmsprop(weight_decay=0.1) needs the parameters")):
        opt.update(jnp.ones(3), state)


def test_params_structure_checked_when_weight_decay_needs_them():
    opt = rmsprop_jax.rmsprop(1e-3, weight_decay=0.1)
    state = opt.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="The structure of params does not match"):
        opt.update({"w": jnp.ones(3)}, state, {"v": jnp.ones(3)})


def test_traced_hyperparameters_are_not_checked_at_trace_time():
    # Inside jit a hyperparameter is a tracer: building the optimizer must not fail.
    @jax.jit
    def first_update(lr, decay):
        opt = rmsprop_jax.rmsprop(lr, decay=decay)
        return opt.update(jnp.ones(2), opt.init(jnp.zeros(2)))[0]

    assert first_update(jnp.float32(0.1), jnp.float32(0.9)).shape == (2,)


def test_inject_hyperparams_weight_decay_needs_params():
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=1e-3)
    state = opt.init(jnp.ones(2))
    with pytest.raises(ValueError, match="weight_decay is a traced value"):
        jax.jit(opt.update)(jnp.ones(2), state)


@pytest.mark.parametrize("build", [rmsprop_jax.rmsprop, lambda **kw: rmsprop_jax.scale_by_rms(**kw)])
@pytest.mark.parametrize("value", ["ignore", "Skip", None, True])
def test_unknown_on_nonfinite(build, value):
    kwargs = {"learning_rate": 1e-3} if build is rmsprop_jax.rmsprop else {}
    with pytest.raises(ValueError, match=re.escape(f"on_nonfinite={value!r} is not supported; allowed: 'propagate'")):
        build(**kwargs, on_nonfinite=value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"eps": 0.0, "decay": 1.0},
            "decay=1.0 with initial_scale=0.0: S_t = S_(t-1) + 0 * g^2 stays 0 forever, so every update would "
            "divide the gradient by eps=0.0 alone. Allowed: decay in [0, 1), or decay=1.0 with initial_scale > 0",
        ),
        (  # eps > 0 does not save it: every step is g / eps, -1e5 per element at lr 1e-3 with g = 1
            {"decay": 1.0},
            "decay=1.0 with initial_scale=0.0: S_t = S_(t-1) + 0 * g^2 stays 0 forever, so every update would "
            "divide the gradient by eps=1e-08 alone.",
        ),
        (
            {"eps": 0.0, "centered": True, "decay": 0.0},
            "eps=0.0 with centered=True and decay=0.0: the centered variance",
        ),
        (
            {"eps": 0.0, "centered": True, "bias_correction": True},
            "eps=0.0 with centered=True and bias_correction=True: the centered variance is exactly 0 "
            "(on the first step)",
        ),
    ],
)
def test_zero_eps_where_every_step_divides_by_zero(kwargs, message):
    for build in (
        rmsprop_jax.rmsprop,
        lambda **kw: rmsprop_jax.scale_by_rms(**{k: v for k, v in kw.items() if k != "learning_rate"}),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            build(learning_rate=1e-3, **kwargs)


def test_zero_eps_is_allowed_where_the_update_is_finite():
    for kwargs in ({"decay": 1.0, "initial_scale": 1.0}, {"centered": True}, {"decay": 0.0}, {"bias_correction": True}):
        rmsprop_jax.rmsprop(1e-3, eps=0.0, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "param", "grad", "message"),
    [
        (
            {"centered": True},
            jnp.ones(2),
            jnp.ones(2, jnp.complex64),
            "updates['w'] has dtype complex64 but the parameter is real (its optimizer state is float32)",
        ),
        (
            {"momentum": 0.9},
            jnp.ones(2, jnp.complex64),
            jnp.ones(2),
            "updates['w'] has dtype float32 but the parameter is complex (its optimizer state is complex64)",
        ),
    ],
)
def test_complex_and_real_mismatch_names_the_path(kwargs, param, grad, message):
    opt = rmsprop_jax.rmsprop(1e-3, **kwargs)
    state = opt.init({"w": param})
    with pytest.raises(TypeError, match=re.escape(message)):
        opt.update({"w": grad}, state)


def test_params_shape_mismatch_names_the_path():
    opt = rmsprop_jax.rmsprop(1e-3, weight_decay=0.1)
    state = opt.init({"w": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=re.escape("params['w'] has shape (2,) but the optimizer state for that leaf has shape (3,)")
    ):
        opt.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(2)})
    with pytest.raises(
        TypeError, match=re.escape("params['w'] has dtype int32; params must be floating point or complex")
    ):
        opt.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3, jnp.int32)})


@pytest.mark.parametrize(
    ("grads", "error"),
    [
        ({"a": jnp.ones(2), "w": jnp.ones(3)}, ValueError),
        ({"w": jnp.ones(2), "b": jnp.ones(2)}, ValueError),
        ({"w": jnp.ones(3), "b": jnp.ones(2, jnp.int32)}, TypeError),
    ],
)
def test_update_errors_need_no_computation(grads, error):
    # Raised while tracing: jax.eval_shape runs no computation at all.
    opt = rmsprop_jax.rmsprop(1e-3, momentum=0.9)
    state = opt.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(error):
        jax.eval_shape(opt.update, grads, state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state_dtype": "not-a-dtype"}, "state_dtype='not-a-dtype' is not supported; allowed: None"),
        ({"decay": "0.9"}, "decay must be a real number; got '0.9'"),
        ({"momentum": 0.5 + 0.1j}, "momentum must be a real number; got (0.5+0.1j)"),
    ],
)
def test_values_of_the_wrong_kind(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rmsprop_jax.rmsprop(1e-3, **kwargs)


def test_there_is_no_16_bit_complex_dtype():
    from rmsprop_jax import _dtypes

    with pytest.raises(TypeError, match="there is no complex dtype with float16 parts"):
        _dtypes.complex_dtype(np.dtype("float16"))


@pytest.mark.parametrize(
    ("make_state", "message"),
    [
        (
            lambda p: optax.chain(optax.clip(1.0), rmsprop_jax.rmsprop(0.1)).init(p),
            "state must be the RmspropState this optimizer's init returned; got a plain tuple of 2 states, as "
            "optax.chain keeps: pass the whole chain's state to the chain's update",
        ),
        (
            lambda p: optax.rmsprop(0.1).init(p)[0],
            "got a state of type optax._src.transform.ScaleByRmsState: pass the state this optimizer's init returned",
        ),
        (
            lambda p: {"count": 0, "nu": p},
            "got a dict with keys ['count', 'nu']: restore a checkpoint with this optimizer's init(params)",
        ),
        (lambda p: rmsprop_jax.scale_by_rms().init(p), "got a state of type rmsprop_jax._transform.ScaleByRmsState"),
    ],
)
def test_a_state_from_elsewhere_is_named(make_state, message):
    params = jnp.ones(3)
    for jit in (False, True):
        update = rmsprop_jax.rmsprop(0.1).update
        with pytest.raises(TypeError, match=re.escape(message)):
            (jax.jit(update) if jit else update)(params, make_state(params))


@pytest.mark.parametrize(
    ("build", "kwargs", "message"),
    [
        (
            rmsprop_jax.rmsprop,
            {"lr": 0.1},
            "'lr' is PyTorch's name for the learning rate, which rmsprop_jax.rmsprop calls 'learning_rate'",
        ),
        (
            rmsprop_jax.rmsprop,
            {"learning_rate": 0.1, "alpha": 0.99},
            "'alpha' is PyTorch's name for the decay of S, which rmsprop_jax.rmsprop calls 'decay'",
        ),
        (
            rmsprop_jax.rmsprop,
            {"learning_rate": 0.1, "rho": 0.9},
            "'rho' is Keras's name for the decay of S, which rmsprop_jax.rmsprop calls 'decay'",
        ),
        (
            rmsprop_jax.rmsprop,
            {"learning_rate": 0.1, "epsilon": 1e-7},
            "'epsilon' is Keras's and TF1's name for eps, which rmsprop_jax.rmsprop calls 'eps'",
        ),
        (rmsprop_jax.rmsprop, {"learning_rate": 0.1, "beta": 0.9}, "which rmsprop_jax.rmsprop calls 'decay'"),
        (
            rmsprop_jax.scale_by_rms,
            {"lr": 0.1},
            "which rmsprop_jax.scale_by_rms does not apply: chain optax.scale_by_learning_rate",
        ),
        (rmsprop_jax.presets.keras, {"lr": 0.1}, "which rmsprop_jax.presets.keras calls 'learning_rate'"),
        (rmsprop_jax.presets.pytorch, {"learning_rate": 0.1}, "which rmsprop_jax.presets.pytorch calls 'lr'"),
        (rmsprop_jax.presets.tf1, {"learning_rate": 0.1, "eps": 1e-3}, "which rmsprop_jax.presets.tf1 calls 'epsilon'"),
        (
            rmsprop_jax.rmsprop,
            {"learning_rate": 0.1, "nonsense": 1},
            "unexpected keyword argument 'nonsense'; it takes: learning_rate, decay, eps,",
        ),
    ],
)
def test_other_frameworks_argument_names_are_translated(build, kwargs, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        build(**kwargs)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, np.dtype("bfloat16"), jnp.dtype("bfloat16")])
def test_state_dtype_as_a_dtype_object_works_like_its_string(dtype):
    import warnings

    params = jnp.ones(3)
    want = rmsprop_jax.rmsprop(0.1, state_dtype="bfloat16").init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX's "implicit conversion of an array to a dtype" deprecation included
        state = rmsprop_jax.rmsprop(0.1, state_dtype=dtype).init(params)
        assert state.nu.dtype == jnp.bfloat16
        # optax.inject_hyperparams takes a dtype class for a schedule and passes an array of that dtype.
        opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1, state_dtype=dtype)
        injected = opt.init(params)
        _, injected = opt.update(jnp.full(3, 0.5), injected, params)
        _, injected = jax.jit(opt.update)(jnp.full(3, 0.5), injected, params)
    assert injected.inner_state.nu.dtype == want.nu.dtype
