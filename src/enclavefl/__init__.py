"""enclavefl: horizontal federated learning with confidential computing."""

from enclavefl.errors import EnclaveFLError

__all__ = ["EnclaveFLError", "__version__"]

__version__ = "0.1.0"
