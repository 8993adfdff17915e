"""Pictures of CAST's hierarchies: the drawing lives in the shared core,
:mod:`hiseg.visualization`; this name is kept so that ``from hiseg_cast.visualize import ...`` works."""
from hiseg.visualization import *  # noqa: F401,F403
from hiseg.visualization import __all__  # noqa: F401
