"""Exit policies: the one exit rule (`base`) and the registered confidence measures.

Importing this package imports every module in it, so every policy registers: the measures of
one exit (`confidence`), those that follow a token across exits (`stateful`), the learned
classifiers (`learned`), and any new file dropped here.
"""

from eexit.policies.base import POLICIES, ExitPolicy, ExitView, make_policy, register_policy
from eexit.registry import import_submodules

import_submodules(__name__)

__all__ = ["POLICIES", "ExitPolicy", "ExitView", "make_policy", "register_policy"]
