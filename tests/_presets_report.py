"""Prints the max deviation of every preset from its reference, over all parity-test cases.

Run from the repository root: ``.venv/bin/python -m tests._presets_report`` (about a minute).
"""

import jax


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from tests import (  # noqa: E402
    _presets_refs as R,
    test_presets_keras as tk,
    test_presets_pytorch as tp,
    test_presets_sources as ts,
)


def main() -> None:
    rows: dict[str, list[float]] = {}

    def add(name: str, devs: tuple[dict[str, float], dict[str, float]]) -> None:
        new = [devs[0]["abs64"], devs[0]["rel32"], devs[1]["abs64"], devs[1]["rel32"]]
        rows[name] = [max(a, b) for a, b in zip(rows.get(name, [0.0] * 4), new, strict=True)]

    for p in tp.CASES:
        ours, make = tp._pair(*p.values)
        add("pytorch vs torch.optim.RMSprop", R.compare(R.run_jax(ours, True), R.run_torch(make, True)))
    for p in tk.CASES:
        ours, make = tk._pair(*p.values)
        add("keras vs keras.optimizers.RMSprop", R.compare(R.run_jax(ours), R.run_keras(make)))
    try:
        from tests import test_presets_tf1_tensorflow as ttf
    except Exception:  # pytest.skip.Exception when TensorFlow is not installed
        ttf = None
    if ttf is not None:
        for p in ttf._cases():
            kw, schedule = p.values
            tf_lr, our_lr = ttf.SCHEDULES[schedule]
            add(
                "tf1 vs tf.compat.v1.train.RMSPropOptimizer",
                R.compare(R.run_jax(ttf.presets.tf1(our_lr, **kw)), ttf._run_tf(kw, tf_lr)),
            )
    for p in ts.TF1_CASES:
        add("tf1 vs TF kernel transcription", ts.tf1_devs(*p.values))
    for p in ts.OPTAX_PARAMS:
        add("optax vs optax.rmsprop", ts.optax_devs(*p.values))
    for name in ts.TRANSCRIBED:
        for schedule in (None, *ts.SCHEDULES):
            add(f"{name} vs transcription", ts.transcribed_devs(name, schedule))
    print("| preset vs reference | sequence f64 abs | sequence f32 rel | MLP f64 abs | MLP f32 rel |")
    print("| --- | --- | --- | --- | --- |")
    for name, v in rows.items():
        print(f"| {name} | " + " | ".join(f"{x:.1e}" for x in v) + " |")


if __name__ == "__main__":
    main()
