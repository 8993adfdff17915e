"""Checkpoint files in the shared core.

* :mod:`hiseg.checkpoint.io`: reading a weights file without unrestricted unpickling, and
  loading it only into the model it fits (``SafeDetectionCheckpointer``);
* :mod:`hiseg.checkpoint.weights_config`: the config values a converted checkpoint stores,
  checked when it is loaded;
* :mod:`hiseg.checkpoint.prefixes`: where a state dict or a built model holds a part (the key
  prefix), and that part's tensors without it.

Writing training checkpoints so that a killed run never leaves a broken one is the trainer's
:mod:`hiseg.engine.atomic_checkpointer`. Activation checkpointing (recomputing activations in
the backward pass) is another thing: :mod:`hiseg.modeling.activation_checkpointing`. Converting
the authors' released CAST / DINO / timm files to ours is CAST's ``hiseg_cast.released_weights``.
"""
