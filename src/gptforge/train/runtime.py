"""gptforge.train.runtime is gptforge.runtime: the device, precision and distributed set-up moved out of
the training package, since evaluation needs it too and must not load training code. Kept so that
existing `from gptforge.train.runtime import ...` lines keep working."""

from gptforge.runtime import (  # noqa: F401
    CPU_BF16_ENV,
    DTYPES,
    Runtime,
    autocast,
    cpu_has_bf16,
    grad_scaler,
    print0,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_runtime,
)
