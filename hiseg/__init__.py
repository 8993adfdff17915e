"""Code shared by the CAST and OAP projects: compatibility, data, engine, evaluation."""
import warnings as _warnings

# fvcore and detectron2 v0.6 decorate functions with ``torch.jit.script`` at import, which recent
# torch releases answer with a FutureWarning per decorated function. Users cannot act on it, and
# it would stand before the one ``error:`` line a bad request gets, so it is silenced here (the
# tools import ``hiseg`` before torch for that reason). Nothing of ours uses ``torch.jit.script``.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
