"""The consistent all-reduce of pseudo-gradients over hivemind.

hivemind's stock butterfly all-reduce lets every member keep its own quantization error, so
members of one group would end a round with slightly different "averages" and apply different
outer steps: a fork of the run. p2pdiloco's reducers instead serialize each averaged slice
**once** and send the same bytes to every member, so all members decode byte-identical averages,
and a round with any slice missing fails for everyone instead of being applied in part.

One job per module:

- :mod:`~p2pdiloco.averaging.wire`: the pure checks of what other peers send (matchmaking
  metadata, reducer notes, parts and averages); the fuzz targets of ``bench/fuzz.py``.
- :mod:`~p2pdiloco.averaging.runner`: one round's all-reduce (``ConsistentAllReduceRunner``), its
  robust reducer and the codec our own parts go out with.
- :mod:`~p2pdiloco.averaging.process`: the hivemind averager process (bans, closed-run membership,
  serving and downloading the state).
- :mod:`~p2pdiloco.averaging.front`: :class:`PseudoGradientAverager`, what the peer calls, and
  :class:`RoundResult`.

Every peer of a swarm must run this runner: the meaning of the ``AVERAGED_PART`` message differs
from stock hivemind, and the run's fingerprint (part of the averaging prefix) keeps peers of
different versions or configs apart. hivemind is pinned exactly because this relies on private
attributes of ``AllReduceRunner`` and ``TensorPartContainer`` in 1.1.12.
"""

from p2pdiloco.averaging.front import PseudoGradientAverager, RoundResult
from p2pdiloco.averaging.runner import SenderCodec
from p2pdiloco.averaging.wire import decode_gather, group_bits, parse_reducer_note

__all__ = ["PseudoGradientAverager", "RoundResult", "SenderCodec", "decode_gather", "group_bits", "parse_reducer_note"]
