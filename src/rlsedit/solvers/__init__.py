"""Pure-tensor solvers: the exact RLS recursion and the closed forms it is compared with.

Everything here takes and returns ``torch`` tensors in our orientation (``W (d_k, d_v)``,
keys ``K (d_k, u)`` as columns, targets ``V (u, d_v)``); nothing touches a model or a file.
"""

from .alphaedit import alphaedit_delta, null_space_projector
from .memit import memit_delta, memit_seq_solve
from .official import official_update
from .oneshot import solve_oneshot
from .rls import RLSState
from .rome import rome_delta, rome_left_vector

__all__ = [
    "RLSState",
    "alphaedit_delta",
    "memit_delta",
    "memit_seq_solve",
    "null_space_projector",
    "official_update",
    "rome_delta",
    "rome_left_vector",
    "solve_oneshot",
]
