"""Vision encoders plugged in through `model.vision.kind: plugin` and `model.vision.factory: "module:function"`."""
