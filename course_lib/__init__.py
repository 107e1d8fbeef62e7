"""course_lib: the tested package behind the notebooks of "DeepSeek, built small"."""

from .config import ModelConfig
from .profiles import get_profile, setup_notebook

__all__ = ["ModelConfig", "get_profile", "setup_notebook"]
__version__ = "0.1.0"
