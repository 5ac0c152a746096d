"""Which TF functions tf-keras writes as ``TFOpLambda`` / ``SlicingOpLambda`` layers in real models.

Builds every ``tf_keras.applications`` model with random weights (``weights=None``, no download),
collects the ``function`` of each TFOpLambda/SlicingOpLambda layer from its config (what a saved
file holds), and prints, per function, the models that use it and whether ``gconv_rewrite.passes.keras``
rebuilds it in Keras 3. ``--save DIR`` also writes each model that holds any as ``DIR/NAME.h5``
and ``DIR/NAME.keras`` (tf-keras's two formats) for end-to-end runs of the tool.

    python benchmarks/tf_keras_tfoplambdas.py                   # the set, ~5 min on 2 cores
    python benchmarks/tf_keras_tfoplambdas.py --only RegNetX002,MobileNetV3Small --save /tmp/tfk
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEEDS_FIXED_INPUT = ("NASNetLarge", "NASNetMobile")  # NASNet requires its native size without weights


def architectures(applications) -> dict[str, object]:
    found = {}
    modules = [applications] + [getattr(applications, n) for n in dir(applications)
                                if not n.startswith("_") and inspect.ismodule(getattr(applications, n))]
    for module in modules:
        for attribute in dir(module):
            item = getattr(module, attribute)
            if attribute[:1].isupper() and callable(item) and not inspect.isclass(item) \
                    and getattr(item, "__module__", "").startswith("tf_keras.src.applications"):
                found.setdefault(attribute, item)
    return dict(sorted(found.items()))


def collect(config, out: dict) -> None:
    """Every TFOpLambda/SlicingOpLambda layer's function, nested models included."""
    if isinstance(config, dict):
        if config.get("class_name") in ("TFOpLambda", "SlicingOpLambda"):
            function = (config.get("config") or {}).get("function")
            out[function] = out.get(function, 0) + 1
        for value in config.values():
            collect(value, out)
    elif isinstance(config, list):
        for value in config:
            collect(value, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--save", type=Path, help="write models holding TFOpLambdas as DIR/NAME.h5 and .keras")
    parser.add_argument("--json", type=Path, help="write the result as JSON")
    parser.add_argument("--input-size", type=int, default=96,
                        help="input height/width where the architecture allows it (default 96; 0: its own default)")
    args = parser.parse_args(argv)

    import tf_keras

    try:
        from gconv_rewrite.passes.keras._tf_ops import REBUILT
    except ImportError:
        REBUILT = {}

    builders = architectures(tf_keras.applications)
    if args.only:
        wanted = args.only.split(",")
        builders = {k: v for k, v in builders.items() if k in wanted}
    per_function: dict[str, dict[str, int]] = {}
    per_model: dict[str, dict[str, int]] = {}
    for name, builder in builders.items():
        start = time.perf_counter()
        kwargs = {"weights": None}
        if name not in NEEDS_FIXED_INPUT and args.input_size:
            kwargs["input_shape"] = (args.input_size, args.input_size, 3)
        try:
            model = builder(**kwargs)
        except Exception:
            try:
                model = builder(weights=None)
            except Exception as exc:
                print(f"{name:24s} cannot build: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                continue
        found: dict[str, int] = {}
        collect(model.get_config(), found)
        per_model[name] = found
        for function, count in found.items():
            per_function.setdefault(function, {})[name] = count
        if args.save and found:
            args.save.mkdir(parents=True, exist_ok=True)
            model.save(args.save / f"{name}.h5")
            model.save(args.save / f"{name}.keras")
        print(f"{name:24s} {time.perf_counter() - start:5.1f}s  {len(model.layers):4d} layers  "
              f"{sum(found.values()):3d} TFOpLambdas  {', '.join(sorted(found)) or '-'}", flush=True)
        del model
        tf_keras.backend.clear_session()
        gc.collect()

    print("\nfunction                          rebuilt  models")
    for function in sorted(per_function):
        models = per_function[function]
        print(f"tf.{function:32s} {'yes' if function in REBUILT else 'NO ':7s}  "
              f"{len(models):2d}: {', '.join(sorted(models))[:100]}")
    if args.json:
        args.json.write_text(json.dumps({"per_function": per_function, "per_model": per_model}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
