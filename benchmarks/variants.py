"""The ablation's model variants, shared by ``real.py`` and ``expression.py``:
``name -> (HPVADE keyword arguments, max_epochs)`` (``None``: the default epochs)."""

VARIANTS = {
    "hpvade": ({}, None),
    "without the VAE path": ({"use_vae": False}, None),
    "without the prototype loss": ({"prototype_weight": 0.0}, None),
    "without the bulk reconstruction": ({"bulk_weight": 0.0}, None),
    "with the prototype loss": ({"prototype_weight": 1.0}, None),
    "with the bulk reconstruction": ({"bulk_weight": 1.0}, None),
    "S learned": ({"learn_signature": True}, None),
    "1 epoch": ({}, 1),
    "400 epochs": ({}, 400),
}
