"""Runs the trainer in a fresh process with N fake CPU devices (multi-device tests need their own backend).

    python tests/train_run.py --devices 8 --workdir W --data SHARDS [--max-steps K] [--config.key=value ...]
"""

import argparse
import os
import sys

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-steps", type=int)
    args, overrides = parser.parse_known_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax

    from bioclip_jax.train.config import load_config
    from bioclip_jax.train.trainer import train

    assert jax.device_count() == args.devices, jax.devices()
    config = load_config(os.path.join(os.path.dirname(__file__), "configs", "tiny_train.py"),
                         [f"data.train={args.data}"] + [o[len("--config."):] for o in overrides])
    result = train(config, args.workdir, max_steps=args.max_steps, progress=False)
    print(f"done step {result.step} loss {result.history[-1]['loss']:.6f}")
    sys.exit(0)
