"""Exit policies: the one exit rule (`base`) and the registered confidence measures.

Importing this package registers every policy: the measures of one exit (`confidence`), those
that follow a token across exits (`stateful`) and the learned classifiers (`learned`).
"""

from eexit.policies import confidence, learned, stateful  # noqa: F401  (registration)
from eexit.policies.base import POLICIES, ExitPolicy, ExitView, make_policy, register_policy

__all__ = ["POLICIES", "ExitPolicy", "ExitView", "make_policy", "register_policy"]
