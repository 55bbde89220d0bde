"""Settings of the privacy accountants that compose DP-SGD steps.

An accountant config chooses the mathematics used to turn a composed
`dp_accounting.DpEvent` into an (epsilon, delta) guarantee, and builds a fresh
`dp_accounting.PrivacyAccountant` on demand:

>>> from jax_privacy.accounting import accountants
>>> accountant = accountants.PldAccountantConfig().create_accountant()
>>> type(accountant).__name__
'PLDAccountant'

Two families are offered:

* Renyi DP (RDP): the Renyi divergence of the mechanism is computed at a grid
  of orders, composition adds the divergences, and the best order is chosen
  when converting to (epsilon, delta). Fast, always an upper bound, slightly
  pessimistic.
* Privacy loss distributions (PLD): the distribution of the privacy loss is
  discretised and composed by convolution. Tighter than RDP (a smaller epsilon
  for the same mechanism) at a higher computational cost; the discretisation is
  rounded pessimistically, so the result is still an upper bound.

References:
  Mironov, "Renyi Differential Privacy", CSF 2017. arXiv:1702.07476.
  Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019. arXiv:1908.10530.
  Koskela, Jalko, Honkela, "Computing Tight Differential Privacy Guarantees
  Using FFT", AISTATS 2020. arXiv:1906.03049.
  Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter
  Discrete Approximations of Privacy Loss Distributions", PETS 2022.
  arXiv:2207.04380.
"""

import abc
import dataclasses
import math
import numbers
from collections.abc import Sequence

import dp_accounting

NeighboringRelation = dp_accounting.NeighboringRelation

# The grid contains every order of dp_accounting's default grid, so epsilon is
# never larger than with dp_accounting's defaults. Orders just above 1 help
# when epsilon is large (heavy composition); large orders help when it is small
# (strong noise or few steps), where they can lower epsilon several-fold.
_DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 100.0 for x in range(1, 10)]
    + [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(x) for x in range(11, 64)]
    + [80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 224.0, 256.0, 384.0, 512.0]
    + [768.0, 1024.0, 1536.0, 2048.0, 3072.0, 4096.0]
)


@dataclasses.dataclass(frozen=True)
class DpAccountantConfig(abc.ABC):
  """Base class of the accountant settings.

  Subclasses are frozen dataclasses that validate their fields on
  construction and build a fresh, empty `dp_accounting.PrivacyAccountant`
  with `create_accountant`.
  """

  @abc.abstractmethod
  def create_accountant(
      self,
      neighboring_relation: NeighboringRelation = (
          NeighboringRelation.ADD_OR_REMOVE_ONE
      ),
  ) -> dp_accounting.PrivacyAccountant:
    """Returns a new accountant with nothing composed yet.

    Args:
      neighboring_relation: Which pairs of data sets the guarantee compares.
        `ADD_OR_REMOVE_ONE` (the default) suits Poisson sampling;
        `REPLACE_ONE` suits batches of fixed size.
    """


@dataclasses.dataclass(frozen=True)
class RdpAccountantConfig(DpAccountantConfig):
  """Renyi-DP accounting over a grid of orders.

  Attributes:
    orders: The Renyi orders at which divergences are tracked; each must be a
      finite number > 1. The default is a dense grid from 1.01 to 4096 that
      contains dp_accounting's default orders. More orders never increase
      epsilon but cost time linearly.

  References:
    Mironov, "Renyi Differential Privacy", 2017. arXiv:1702.07476.
    Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
    Mechanism", 2019. arXiv:1908.10530.
  """

  orders: Sequence[float] = _DEFAULT_RDP_ORDERS

  def __post_init__(self):
    try:
      orders = tuple(self.orders)
    except TypeError:
      orders = None
    if not orders or isinstance(self.orders, (str, bytes)):
      raise ValueError(
          'orders must be a non-empty sequence of numbers > 1, got'
          f' {self.orders!r}.'
      )
    for order in orders:
      if (
          isinstance(order, bool)
          or not isinstance(order, numbers.Real)
          or not math.isfinite(order)
          or order <= 1
      ):
        raise ValueError(
            f'orders must contain only finite numbers > 1, got {order!r}.'
        )
    object.__setattr__(self, 'orders', tuple(float(o) for o in orders))

  def create_accountant(
      self,
      neighboring_relation: NeighboringRelation = (
          NeighboringRelation.ADD_OR_REMOVE_ONE
      ),
  ) -> dp_accounting.rdp.RdpAccountant:
    return dp_accounting.rdp.RdpAccountant(
        orders=list(self.orders), neighboring_relation=neighboring_relation
    )


@dataclasses.dataclass(frozen=True)
class PldAccountantConfig(DpAccountantConfig):
  """Privacy-loss-distribution accounting.

  Attributes:
    value_discretization_interval: Width of the grid on which privacy losses
      are discretised, > 0. Smaller is tighter and slower; 1e-4 (the default)
      is tight to about that much in epsilon per composition step, 1e-3 is
      several times faster and usually within a few percent.

  References:
    Koskela, Jalko, Honkela, "Computing Tight Differential Privacy Guarantees
    Using FFT", 2020. arXiv:1906.03049.
    Doroshenko et al., "Connect the Dots: Tighter Discrete Approximations of
    Privacy Loss Distributions", 2022. arXiv:2207.04380.
  """

  value_discretization_interval: float = 1e-4

  def __post_init__(self):
    value = self.value_discretization_interval
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
      raise ValueError(
          'value_discretization_interval must be a finite number > 0, got'
          f' {value!r}.'
      )

  def create_accountant(
      self,
      neighboring_relation: NeighboringRelation = (
          NeighboringRelation.ADD_OR_REMOVE_ONE
      ),
  ) -> dp_accounting.pld.PLDAccountant:
    return dp_accounting.pld.PLDAccountant(
        neighboring_relation=neighboring_relation,
        value_discretization_interval=self.value_discretization_interval,
    )
